"""Frozen-feature extraction, sharded over the ranks and gathered back in dataset order.

Each rank runs the model on its shard (a ``DistributedSampler`` without shuffling); every
sample carries its index, and the gathered features are written back by index, so the
result is the single-process one, on every rank, whatever the world size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from moco_mgd.runtime import distributed
from moco_mgd.runtime.loader_workers import ignore_stop_signals, shut_down_workers

__all__ = ["IndexedDataset", "extract_features"]


class IndexedDataset(Dataset):
    """Wraps a ``(image, label)`` dataset to yield ``(index, image, label)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return index, image, label


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``dataset``; return its outputs and labels in order.

    Args:
        model: maps images to ``[B, D]`` features (e.g. a ResNet whose ``fc`` is identity).
        dataset: yields ``(image_tensor, label)``.
        batch_size: images per forward on each rank.
        device: where to run the model.
        workers: DataLoader worker processes.
        autocast_dtype: run under autocast with this dtype (e.g. bf16 on GPU).
        progress: called on the main process with (images done, all images), about every 10% of the
            way and at the end (the images of all processes, counted from the main one's share).

    Returns:
        ``(features, labels)``: ``Tensor[N, D]`` float32 and ``LongTensor[N]`` on CPU, in
        dataset order, identical on every rank.
    """
    device = torch.device(device)
    # Each module's own mode is put back, not the top module's for all: a view such as
    # resnet_trunk(teacher) is a new (training) Sequential around a frozen teacher's eval-mode layers.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    indexed = IndexedDataset(dataset)
    # Padded so that every rank has as many rows, which all_gather needs; a repeat writes the same row twice.
    loader = DataLoader(indexed, batch_size=batch_size, sampler=distributed.shard_indices(len(indexed), padded=True),
                        num_workers=workers, worker_init_fn=ignore_stop_signals,
                        pin_memory=device.type == "cuda")
    indices, feats, labels = [], [], []
    batches = iter(loader)
    report_every = max(1, len(loader) // 10)
    try:
        for step, (index, images, label) in enumerate(batches, start=1):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(images.to(device, non_blocking=True))
            feats.append(out.float().flatten(1))
            indices.append(index.to(device))
            labels.append(torch.as_tensor(label).to(device))
            if progress is not None and distributed.is_main_process() and (
                    step % report_every == 0 or step == len(loader)):
                progress(min(step * batch_size * distributed.get_world_size(), len(dataset)), len(dataset))
    finally:
        shut_down_workers(batches)   # on an error too: a traceback keeps the iterator alive
        for module, training in modes:
            module.training = training
    local_feats = torch.cat(feats)  # n_local x D
    all_feats = distributed.all_gather_cat(local_feats).cpu()
    all_indices = distributed.all_gather_cat(torch.cat(indices)).cpu()
    all_labels = distributed.all_gather_cat(torch.cat(labels).long()).cpu()
    features = torch.empty(len(dataset), all_feats.shape[1], dtype=torch.float32)
    ordered_labels = torch.empty(len(dataset), dtype=torch.long)
    features[all_indices] = all_feats
    ordered_labels[all_indices] = all_labels
    return features, ordered_labels
