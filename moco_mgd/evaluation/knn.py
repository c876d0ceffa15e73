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
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from moco_mgd.runtime import distributed
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS, build_resnet, load_frozen_backbone, resnet_trunk
from moco_mgd.runtime.data import DATASETS, build_dataset, check_same_classes, eval_transform, random_subset
from moco_mgd.evaluation.features import extract_features
from moco_mgd.runtime.launch import init_process_group, launched_by_torchrun

__all__ = ["BACKENDS", "knn_search", "knn_classify", "knn_accuracy", "knn_evaluate", "main"]

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
                 num_classes: int, k: int = 200, temperature: float = 0.1, backend: str = "faiss",
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
                 device: torch.device | str, k: int = 200, temperature: float = 0.1, workers: int = 0,
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
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = slice(rank * math.ceil(len(val_f) / world), (rank + 1) * math.ceil(len(val_f) / world))
    queries, labels = val_f[mine], val_l[mine]
    if backend == "torch":  # brute force is only fast on the accelerator
        train_f, queries = train_f.to(device), queries.to(device)
    scores = knn_classify(train_f, train_l, queries, num_classes, k, temperature, backend,
                          use_gpu=None if device.type == "cuda" else False)
    correct = _correct(scores, labels, (1, 5))
    counts = distributed.all_reduce_sum(torch.stack(list(correct.values())).to(device))
    return {name: 100.0 * count / len(val_f) for name, count in zip(correct, counts.tolist())}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m moco_mgd.evaluation.knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", nargs="?", default="", help="holds train/CLASS/* and val/CLASS/*"
                        " (fashion-mnist: the IDX directory, default /usr/share/datasets/fashion-mnist)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--pretrained", help="this project's, MoCo's or a torchvision checkpoint")
    weights.add_argument("--random-init", action="store_true",
                         help="no checkpoint: a randomly initialised network (--seed), the floor pretraining must beat")
    parser.add_argument("--seed", default=0, type=int, help="of --random-init and of the --max-images draw")
    parser.add_argument("--max-images", default=0, type=int,
                        help="a random subset of this many train images as the bank (0: all); with the same "
                             "--seed it is the subset main_moco_mgd.py --max-images trained on")
    parser.add_argument("-a", "--arch", default="resnet18", choices=RESNET_ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--image-size", default=224, type=int, help="side of the centre crop")
    parser.add_argument("-k", default=200, type=int, help="neighbours (MoCo's demo: 200, DINO: 20)")
    parser.add_argument("--temperature", default=0.1, type=float, help="vote temperature (DINO: 0.07)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, help="images per forward, per process")
    parser.add_argument("-j", "--workers", default=8, type=int, help="data loading workers per process")
    parser.add_argument("--backend", default="faiss", choices=BACKENDS)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="autocast of the feature extraction; auto = bf16 on GPU, off on CPU")
    parser.add_argument("--output-dir", default="", help="also append the result to OUTPUT_DIR/metrics.jsonl")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The CLI: prints ``kNN (k=.., T=..) top-1 .. top-5 .. on N val images`` (rank 0)."""
    from moco_mgd.runtime.logs import setup_logging

    parser = get_args_parser()
    args, torchrun = parser.parse_args(argv), launched_by_torchrun()
    rank = int(os.environ["RANK"]) if torchrun else 0
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if torchrun else 0)
        torch.cuda.set_device(device)
    setup_logging(None, rank)
    amp = "bf16" if args.amp == "auto" and device.type == "cuda" else args.amp
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    try:
        if args.backend == "faiss" and importlib.util.find_spec("faiss") is None:
            raise ValueError("faiss is not installed: install faiss-cpu or faiss-gpu, or pass --backend torch")
        if args.random_init:
            torch.manual_seed(args.seed)
            model = resnet_trunk(build_resnet(args.arch, stem=args.stem)).eval().requires_grad_(False)
        else:
            model = load_frozen_backbone(args.arch, args.pretrained, args.stem)
        model = model.to(device)
        if args.max_images < 0:
            raise ValueError(f"--max-images {args.max_images}: pass a positive number, or 0 for all images")
        train_set, val_set = (build_dataset(args.dataset, args.data, split, eval_transform(args.image_size))
                              for split in ("train", "val"))
        check_same_classes(train_set, val_set)
        if args.max_images:
            train_set = random_subset(train_set, args.max_images, args.seed)
        if args.k > len(train_set):
            raise ValueError(f"k={args.k} is larger than the {len(train_set)} train images: lower -k")
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if torchrun:
        init_process_group("nccl", "env://", int(os.environ["WORLD_SIZE"]), rank, device)
    try:
        logger.info(f"kNN of {args.arch} {args.pretrained or 'random init (seed ' + str(args.seed) + ')'}: {len(train_set)} train, {len(val_set)} val images, "
                    f"{distributed.get_world_size()} process(es) on {device}, {args.backend} search")
        result = knn_evaluate(model, train_set, val_set, args.batch_size, device, args.k, args.temperature,
                              args.workers, autocast_dtype, args.backend)
    finally:
        if torchrun:
            dist.destroy_process_group()
    if rank == 0:
        top5 = f" top-5 {result['top5']:.2f}" if "top5" in result else ""
        print(f"kNN (k={args.k}, T={args.temperature}) top-1 {result['top1']:.2f}{top5} on {len(val_set)} val images")
        if args.output_dir:
            from moco_mgd.runtime.logs import MetricsLog

            os.makedirs(args.output_dir, exist_ok=True)
            metrics = MetricsLog(args.output_dir, True)
            metrics.log("knn", epoch=0, k=args.k, temperature=args.temperature, **result)


if __name__ == "__main__":
    main()
