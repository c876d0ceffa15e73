"""Weighted k-nearest-neighbour classification of frozen features: the kNN monitor and its CLI.

Each query's top-k train neighbours (cosine similarity) vote for their label with weight
``exp(sim / T)`` (Wu et al. 2018; MoCo's CIFAR demo: k=200, T=0.1; DINO: k=20, T=0.07). The
search runs in faiss (exact ``IndexFlatIP``, on GPU when there is one) or in plain torch (the
brute-force reference); both find the same neighbours. Usage::

    python -m moco_mgd.evaluation.knn /data/imagenet --pretrained moco_v2_200ep_pretrain.pth.tar -a resnet50
    torchrun --nproc-per-node 8 -m moco_mgd.evaluation.knn /data/imagenet --pretrained ... -a resnet50
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from moco_mgd.runtime import distributed
from moco_mgd.checkpoints.formats import load_frozen_backbone
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS, build_resnet, resnet_trunk
from moco_mgd.models.stages import check_image_size
from moco_mgd.data import (DATASETS, VAL_HOLDOUT_HELP, build_dataset, check_same_classes, eval_transform,
                                   random_subset)
from moco_mgd.evaluation.features import extract_features
from moco_mgd.runtime import launch
from moco_mgd.runtime.flag_checks import AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, check_numbers
from moco_mgd.runtime.launch import DistEnv
from moco_mgd.runtime.precision import AMP_MODES, autocast_dtype
from moco_mgd.training.flags import InputConfig

# The kNN defaults of every command (pretraining's monitor, this CLI, linear evaluation's --knn-k): MoCo's
# CIFAR demo, k=200 neighbours and a vote temperature of 0.1 (DINO uses 20 and 0.07).
KNN_K = 200
KNN_T = 0.1

__all__ = ["BACKENDS", "knn_search", "knn_classify", "knn_accuracy", "knn_evaluate", "KnnConfig", "check_config", "main"]

logger = logging.getLogger("moco_mgd")

BACKENDS = ("faiss", "torch")
# Similarities per block of the torch backend (256 MiB): 4096 queries x a 1.28M bank would be 21 GB.
_TORCH_BLOCK = 1 << 26


def _faiss_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int,
                  use_gpu: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss  # imported here: slow to import, and the torch backend does without it
    index = searched = faiss.IndexFlatIP(bank.shape[1])  # searched: its GPU copy if there is one
    index.add(bank.cpu().contiguous().numpy())
    num_gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() else 0
    device_id = queries.device.index if queries.is_cuda else torch.cuda.current_device() if num_gpus else 0
    try:
        if num_gpus == 0 and use_gpu:
            raise RuntimeError("no GPU visible to both faiss and torch, or faiss is a CPU build")
        if num_gpus > 0 if use_gpu is None else use_gpu:
            resources = faiss.StandardGpuResources()  # noqa: F841 - must outlive the GPU index
            searched = faiss.index_cpu_to_gpu(resources, device_id, index)
    except Exception as exc:  # noqa: BLE001 - any GPU failure has the same remedy: the CPU index
        logger.warning(f"kNN: faiss on GPU {device_id} failed ({exc}): searching on the CPU index")
    sims, indices = [], []
    for chunk in queries.cpu().split(chunk_size):
        block = chunk.contiguous().numpy()
        try:
            s, i = searched.search(block, k)
        except Exception as exc:  # noqa: BLE001 - e.g. k above GPU faiss's limit (2048)
            if searched is index:  # a CPU failure is a real error
                raise
            logger.warning(f"kNN: GPU faiss search failed ({exc}): searching on the CPU index")
            searched = index
            s, i = index.search(block, k)
        sims.append(torch.from_numpy(s))
        indices.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(indices)


def _torch_search(bank: torch.Tensor, queries: torch.Tensor, k: int,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    step = max(k, _TORCH_BLOCK // chunk_size)
    sims, indices = [], []
    for chunk in queries.split(chunk_size):
        best_s = best_i = None
        for start in range(0, len(bank), step):
            part = bank[start:start + step]
            s, i = (chunk @ part.T).topk(min(k, len(part)), dim=1)
            i += start
            if best_s is not None:  # merge with the best k of the earlier bank blocks
                s, pos = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, pos)
            best_s, best_i = s, i
        sims.append(best_s)
        indices.append(best_i)
    return torch.cat(sims), torch.cat(indices)


def knn_search(train_features: torch.Tensor, query_features: torch.Tensor, k: int, backend: str = "faiss",
               chunk_size: int = 4096, use_gpu: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar train features of every query.

    Args:
        train_features: ``[N, D]`` bank; query_features: ``[Nq, D]`` (both normalised here).
        k: neighbours per query, at most ``N``.
        backend: ``"faiss"`` (``IndexFlatIP``) or ``"torch"`` (brute-force matmul + topk).
        chunk_size: queries per search call, which bounds the memory of each step.
        use_gpu: faiss on GPU; ``None``: when faiss sees a GPU. Failures fall back to CPU.

    Returns:
        ``(similarities, indices)``, ``[Nq, k]`` each, best first, on the queries' device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if train_features.ndim != 2 or query_features.shape[1:] != train_features.shape[1:] or min(k, chunk_size) < 1:
        raise ValueError(f"need [N, D] train and [Nq, D] query features, k >= 1, chunk_size >= 1; got "
                         f"{tuple(train_features.shape)}, {tuple(query_features.shape)}, {k}, {chunk_size}")
    if k > len(train_features):
        raise ValueError(f"k={k} is larger than the {len(train_features)} train features: lower -k")
    bank, queries = F.normalize(train_features.float(), dim=1), F.normalize(query_features.float(), dim=1)
    if not len(queries):  # e.g. a rank whose slice of a small val set is empty
        return torch.empty(0, k, device=queries.device), torch.empty(0, k, dtype=torch.long, device=queries.device)
    if backend == "torch":
        return _torch_search(bank.to(queries.device), queries, k, chunk_size)
    sims, indices = _faiss_search(bank, queries, k, chunk_size, use_gpu)
    return sims.to(queries.device), indices.to(queries.device)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 num_classes: int, k: int = KNN_K, temperature: float = KNN_T, backend: str = "faiss",
                 chunk_size: int = 4096, use_gpu: bool | None = None) -> torch.Tensor:
    """Class scores of the queries: their top-k neighbours vote with weight ``exp(sim / T)``.

    Args:
        train_features, train_labels: the bank ``[N, D]`` and its labels ``[N]``.
        query_features: ``[Nq, D]``; num_classes: columns of the result.
        k, temperature: MoCo's CIFAR demo defaults (200, 0.1); DINO uses 20, 0.07.
        backend, chunk_size, use_gpu: see :func:`knn_search`.

    Returns:
        ``FloatTensor[Nq, num_classes]`` of summed vote weights, on the queries' device.
    """
    if len(train_labels) != len(train_features):
        raise ValueError(f"{len(train_labels)} train labels for {len(train_features)} train features")
    sims, indices = knn_search(train_features, query_features, k, backend, chunk_size, use_gpu)
    votes = train_labels.to(indices.device).long()[indices]
    scores = torch.zeros(len(indices), num_classes, device=indices.device)
    return scores.scatter_add_(1, votes, (sims / temperature).exp())


def _correct(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int]) -> dict[str, torch.Tensor]:
    """Number of queries whose label is in their ``top-k`` scores, for each usable k."""
    ks = [k for k in topk if k <= scores.shape[1]]
    ranked = scores.topk(max(ks, default=0), dim=1).indices == labels.to(scores.device).view(-1, 1)
    return {f"top{k}": ranked[:, :k].any(dim=1).sum().double().cpu() for k in ks}


def knn_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent of ``[N, C]`` scores and ``[N]`` labels: ``{"top1": .., "top5": ..}``
    (a ``top{k}`` is left out when there are fewer than ``k`` classes)."""
    correct = _correct(scores, labels, topk)
    return {name: 100.0 * count.item() / max(len(labels), 1) for name, count in correct.items()}


def knn_evaluate(model: nn.Module, train_set: Dataset, val_set: Dataset, batch_size: int,
                 device: torch.device | str, k: int = KNN_K, temperature: float = KNN_T, workers: int = 0,
                 autocast_dtype: torch.dtype | None = None, backend: str = "faiss") -> dict[str, float]:
    """kNN accuracy of ``model``'s features: ``val_set`` classified against ``train_set``.

    Features are extracted over all ranks; each rank then classifies its slice of the val
    set and the correct counts are summed, so the result is identical on every rank.

    Args:
        model: maps images to ``[B, D]`` features (e.g. a frozen backbone), on ``device``.
        train_set, val_set: labelled image datasets; batch_size, workers: per rank.
        k, temperature, backend: see :func:`knn_classify`; autocast_dtype: of the extraction.

    Returns: ``{"top1": ..., "top5": ...}`` in percent (see :func:`knn_accuracy`).
    """
    device = torch.device(device)
    train_f, train_l = extract_features(model, train_set, batch_size, device, workers, autocast_dtype)
    val_f, val_l = extract_features(model, val_set, batch_size, device, workers, autocast_dtype)
    num_classes = max(len(getattr(train_set, "classes", ())), int(train_l.max()) + 1, int(val_l.max()) + 1)
    return knn_features_accuracy(train_f, train_l, val_f, val_l, num_classes, k, temperature, device, backend)


def knn_features_accuracy(train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                          num_classes: int, k: int, temperature: float, device: torch.device,
                          backend: str = "faiss") -> dict[str, float]:
    """:func:`knn_evaluate` on features already extracted, identical on every rank (e.g. the cached
    features of a linear evaluation). Each rank classifies its slice of ``val_f``; counts are summed."""
    mine = torch.tensor(distributed.shard_indices(len(val_f)), dtype=torch.long)  # each query on one rank
    queries, labels = val_f[mine], val_l[mine]
    if backend == "torch":  # brute force is only fast on the accelerator
        train_f, queries = train_f.to(device), queries.to(device)
    scores = knn_classify(train_f, train_l, queries, num_classes, k, temperature, backend,
                          use_gpu=None if device.type == "cuda" else False)
    correct = _correct(scores, labels, (1, 5))
    counts = distributed.all_reduce_sum(torch.stack(list(correct.values())).to(device))
    return {name: 100.0 * count / len(val_f) for name, count in zip(correct, counts.tolist())}


@dataclass
class KnnConfig(InputConfig):
    """Everything a kNN evaluation of the CLI depends on (the defaults of its flags); the network and its
    images are :class:`~moco_mgd.training.flags.InputConfig`'s fields."""

    pretrained: str | None = None
    random_init: bool = False
    seed: int = 0
    k: int = KNN_K
    temperature: float = KNN_T
    workers: int = 8
    backend: str = "faiss"
    amp: str = "auto"
    output_dir: str = ""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m moco_mgd.evaluation.knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", nargs="?", help="holds train/CLASS/* and val/CLASS/*"
                        " (fashion-mnist: the IDX directory, default /usr/share/datasets/fashion-mnist)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--pretrained", help="this project's, MoCo's or a torchvision checkpoint")
    weights.add_argument("--random-init", action="store_true",
                         help="no checkpoint: a randomly initialised network (--seed), the floor pretraining must beat")
    parser.add_argument("--seed", type=int, help="of --random-init and of the --max-images draw")
    parser.add_argument("--max-images", type=int,
                        help="a random subset of this many train images as the bank (0: all); with the same "
                             "--seed it is the subset main_moco_mgd.py --max-images trained on")
    parser.add_argument("--val-holdout", type=float, help=VAL_HOLDOUT_HELP)
    parser.add_argument("-a", "--arch", choices=RESNET_ARCHS)
    parser.add_argument("--stem", choices=STEMS)
    parser.add_argument("--dataset", choices=DATASETS)
    parser.add_argument("--image-size", type=int, help="side of the centre crop")
    parser.add_argument("--knn-k", "-k", dest="k", type=int, help="neighbours (MoCo's demo: 200, DINO: 20)")
    parser.add_argument("--knn-t", "--temperature", dest="temperature", type=float,
                        help="vote temperature (MoCo's demo: 0.1, DINO: 0.07)")
    parser.add_argument("-b", "--batch-size", type=int, help="images per forward, per process")
    parser.add_argument("-j", "--workers", type=int, help="data loading workers per process")
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--amp", choices=AMP_MODES, help="autocast of the feature extraction; auto = bf16 on GPU, "
                        "off on CPU")
    parser.add_argument("--output-dir", help="also append the result to OUTPUT_DIR/metrics.jsonl")
    launch.add_launch_arguments(parser.add_argument_group("processes (as main_moco_mgd.py; torchrun works too)"))
    return launch.set_config_defaults(parser, KnnConfig)


def _network(config: KnnConfig) -> nn.Module:
    if config.random_init:
        torch.manual_seed(config.seed)
        return resnet_trunk(build_resnet(config.arch, stem=config.stem)).eval().requires_grad_(False)
    return load_frozen_backbone(config.arch, config.pretrained, config.stem)


def _datasets(config: KnnConfig) -> tuple[Dataset, Dataset]:
    train_set, val_set = (build_dataset(config.dataset, config.data, split, eval_transform(config.image_size),
                                        val_holdout=config.val_holdout) for split in ("train", "val"))
    check_same_classes(train_set, val_set)
    if config.max_images:
        train_set = random_subset(train_set, config.max_images, config.seed)
    return train_set, val_set


def check_config(config: KnnConfig, world_size: int, local_world_size: int) -> None:
    """Refuse a kNN run that cannot work, before any process starts."""
    check_numbers([("--max-images", config.max_images, NON_NEGATIVE[0], ">= 0 (0: all images)"),
                   ("--knn-k", config.k, *AT_LEAST_1), ("--knn-t", config.temperature, *POSITIVE),
                   ("-b/--batch-size", config.batch_size, *AT_LEAST_1), ("-j/--workers", config.workers, *NON_NEGATIVE),
                   ("--image-size", config.image_size, *AT_LEAST_1), ("--seed", config.seed, *SEED)])
    check_image_size(config.image_size, config.stem)
    if config.backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ValueError("faiss is not installed: install faiss-cpu or faiss-gpu, or pass --backend torch")
    _network(config)
    train_set, _ = _datasets(config)
    if config.k > len(train_set):
        raise ValueError(f"k={config.k} is larger than the {len(train_set)} train images: lower --knn-k")


def knn_main(config: KnnConfig, env: DistEnv) -> None:
    """One process of the CLI (every launch mode ends here): prints the result on rank 0."""
    from moco_mgd.runtime.logs import MetricsLog, setup_logging

    setup_logging(None, env.rank)
    model = _network(config).to(env.device)
    train_set, val_set = _datasets(config)
    source = config.pretrained or f"random init (seed {config.seed})"
    logger.info(f"kNN of {config.arch} {source}: {len(train_set)} train, {len(val_set)} val images, "
                f"{env.world_size} process(es) on {env.device}, {config.backend} search")
    result = knn_evaluate(model, train_set, val_set, config.batch_size, env.device, config.k, config.temperature,
                          config.workers, autocast_dtype(config.amp, env.device), config.backend)
    if env.is_main:
        top5 = f" top-5 {result['top5']:.2f}" if "top5" in result else ""
        print(f"kNN (k={config.k}, T={config.temperature}) top-1 {result['top1']:.2f}{top5} on {len(val_set)} "
              f"val images")
        if config.output_dir:
            os.makedirs(config.output_dir, exist_ok=True)
            MetricsLog(config.output_dir, True).log("knn", epoch=0, k=config.k, temperature=config.temperature,
                                                    **result)


def main(argv: list[str] | None = None) -> None:
    """The CLI: prints ``kNN (k=.., T=..) top-1 .. top-5 .. on N val images`` (rank 0)."""
    launch.run_main(get_args_parser(), argv, KnnConfig, check_config, knn_main, "python -m moco_mgd.evaluation.knn")


if __name__ == "__main__":
    main()
