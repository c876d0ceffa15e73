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
        return seeded_call(sample_seed(self.seed, epoch, index), self.dataset.__getitem__, index)


def seeded_call(seed: int, function, *args):
    """``function(*args)`` on torch's and Python's global RNGs seeded by ``seed``; both are put back after."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        return function(*args)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


# The bag-member draws are seeded from the run's seed plus this offset: distinct from the anchors'
# augmentation seeds, so the anchors' views are those of a run without BINGO (exact pairing).
BAG_MEMBER_SEED_OFFSET = 4_000_037


class WithBagMember(Dataset):
    """BINGO's samples: each of ``pairs`` (a :class:`SeededSamples` of two crops, ``((q, k), label)``)
    with one augmented view of a member of its bag: ``((q, k, member_view), label)``.

    Args:
        pairs: the anchors' samples, indexed by ``(epoch, index)``.
        members: the same images under one crop of the pretraining augmentation.
        bags: ``LongTensor[N, k]``, each image's bag (:mod:`moco_mgd.training.bags`).
        seed: the run's seed.

    Which member, and its augmentation, come from RNGs seeded by ``(seed + offset, epoch, index)``
    alone: like the anchors' views, independent of ``-j`` and the same after a resume, and they
    leave the anchors' views exactly those of a run without BINGO.
    """

    def __init__(self, pairs: SeededSamples, members: Dataset, bags: torch.Tensor, seed: int):
        if len(bags) != len(pairs) or len(members) != len(pairs):
            raise ValueError(f"{len(bags)} bags and {len(members)} member images for {len(pairs)} training images: "
                             f"the bags were built for another image set")
        self.pairs, self.members, self.bags, self.seed = pairs, members, bags, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        (query, key), label = self.pairs[item]
        seed = sample_seed(self.seed + BAG_MEMBER_SEED_OFFSET, epoch, index)
        member = int(self.bags[index, random.Random(seed).randrange(self.bags.shape[1])])
        member_view, _ = seeded_call(seed, self.members.__getitem__, member)
        return (query, key, member_view), label


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
