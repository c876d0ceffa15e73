"""Reproducible sampling: per-sample augmentation seeds and a sampler that resumes mid-epoch."""
from __future__ import annotations

import hashlib
import random

import torch
from torch.utils.data import Dataset, DistributedSampler

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentations in one epoch: a function of these three numbers alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``, each sample augmented from RNGs seeded by
    :func:`sample_seed` ``(seed, epoch, index)``.

    Why: a sample's augmentations then depend neither on which process or loader worker reads
    it (``-j`` changes nothing) nor on what ran before it, so an epoch stopped part-way goes on,
    after a resume, with the very batches it would have had. The caller's torch and Python RNG
    states are put back after each sample: with ``-j 0`` the training process's own streams
    (shuffle BN, random drop) stay as they were.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        seed = sample_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` for :class:`SeededSamples`: it yields ``(epoch, index)``, and an
    epoch can start after its first ``batches_done`` batches (a resume mid-epoch).

    The order of an epoch is DistributedSampler's (seeded by ``seed + epoch``), so a resumed epoch
    reads exactly the indices the uninterrupted one would have read after that point.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.batches_done = 0

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        super().set_epoch(epoch)
        self.batches_done = batches_done

    def batches_per_epoch(self) -> int:
        return super().__len__() // self.batch_size

    def __iter__(self):
        skipped = self.batches_done * self.batch_size
        return ((self.epoch, index) for index in list(super().__iter__())[skipped:])

    def __len__(self) -> int:
        return super().__len__() - self.batches_done * self.batch_size
