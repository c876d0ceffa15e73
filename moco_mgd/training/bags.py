"""BINGO's bags: each training image with its ``k`` nearest neighbours in the frozen teacher's eyes.

Built once, before the student trains: the teacher's backbone (its pooled features, before the
head, as BINGO's ``compute_knn.py``) embeds every training image under the evaluation transform;
an exact inner-product search on the L2-normalised features (faiss ``IndexFlatIP``, this project's
kNN path; the extraction sharded over the processes) gives each image its ``k`` nearest *other*
images. The bag file holds the bags with what they were built from: the teacher checkpoint's
sha256 and the image set (dataset, directory, split, subset, image size, stem). A run reuses a
bag file only when both match; the checkpoint records the bag file's own sha256, and a resume
refuses a bag file that changed.

Also a command, to build the bags once and share them between runs (``--bingo-bags FILE``)::

    python -m moco_mgd.training.bags DIR --teacher-checkpoint T --bingo-k 5 --output bags.pt [...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from moco_mgd.checkpoints import files as ckpt
from moco_mgd.checkpoints.files import file_sha256
from moco_mgd.checkpoints.formats import load_frozen_teacher
from moco_mgd.data import DATASETS, VAL_HOLDOUT_HELP, build_dataset, eval_transform, random_subset
from moco_mgd.evaluation.features import extract_features
from moco_mgd.evaluation.knn import BACKENDS, knn_search
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS, resnet_trunk
from moco_mgd.runtime import distributed
from moco_mgd.runtime.logs import format_duration

__all__ = ["BAG_FILE", "BagSource", "check_bag_size", "search_bags", "bag_source", "read_bags", "check_bags",
           "build_bags", "main"]

logger = logging.getLogger("moco_mgd")

BAG_FILE = "bags.pt"   # in the run's output directory, unless --bingo-bags names one
FORMAT = 1


@dataclass(frozen=True)
class BagSource:
    """What a set of bags was built from: the teacher's file and the training images (exactly the
    images, in the order, that the run trains on)."""

    teacher_sha256: str
    images: dict

    def describe_difference(self, other: BagSource) -> str:
        if self.teacher_sha256 != other.teacher_sha256:
            return (f"another teacher (sha256 {other.teacher_sha256[:12]}..., this run's is "
                    f"{self.teacher_sha256[:12]}...)")
        changed = {key for key in self.images.keys() | other.images.keys()
                   if self.images.get(key) != other.images.get(key)}
        return "another image set (" + ", ".join(
            f"{key} {other.images.get(key)!r} there, {self.images.get(key)!r} here" for key in sorted(changed)) + ")"


def bag_source(teacher_checkpoint: str, dataset: str, data: str, val_holdout: float, max_images: int, seed: int,
               image_size: int, stem: str, num_images: int) -> BagSource:
    """The :class:`BagSource` of a run's settings (``seed`` draws the ``--max-images`` subset)."""
    return BagSource(file_sha256(teacher_checkpoint), {
        "dataset": dataset, "data": os.path.abspath(data) if data else "", "val_holdout": float(val_holdout),
        "max_images": int(max_images), "subset_seed": int(seed) if max_images else None,
        "image_size": int(image_size), "stem": stem, "num_images": int(num_images)})


def check_bag_size(k: int, num_images: int) -> None:
    """A bag holds 1 to ``num_images - 1`` other images."""
    if not 1 <= k < num_images:
        raise ValueError(f"--bingo-k {k}: a bag holds 1 to {num_images - 1} other images of the {num_images} "
                         f"training images; lower --bingo-k")


def search_bags(features: torch.Tensor, k: int, backend: str = "faiss", chunk_size: int = 4096) -> torch.Tensor:
    """Each row's ``k`` most cosine-similar *other* rows, nearest first: ``LongTensor[N, k]``.

    The search asks for ``k + 1`` neighbours and drops the row itself; where an exact duplicate
    pushed the row out of its own list, the farthest neighbour goes instead.
    """
    check_bag_size(k, len(features))
    _, neighbours = knn_search(features, features, k + 1, backend=backend, chunk_size=chunk_size)
    neighbours = neighbours.cpu()
    drop = neighbours == torch.arange(len(features))[:, None]
    drop[~drop.any(1), -1] = True
    return neighbours[~drop].view(len(features), k)


def read_bags(path: str | os.PathLike) -> dict:
    """A bag file, checked for its layout (not yet for what it was built from: :func:`check_bags`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure has one message
        raise ValueError(f"--bingo-bags {path}: not a bag file this project wrote ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not {"bags", "teacher_sha256", "images"} <= state.keys():
        raise ValueError(f"--bingo-bags {path}: not a bag file of format {FORMAT} (python -m moco_mgd.training.bags "
                         f"writes them)")
    return state


def check_bags(state: dict, path: str | os.PathLike, source: BagSource, k: int) -> None:
    """Refuse bags built from another teacher or image set, or of another size."""
    theirs = BagSource(state["teacher_sha256"], state["images"])
    if theirs != source:
        raise ValueError(f"--bingo-bags {path} was built from {source.describe_difference(theirs)}: build bags "
                         f"for this run (python -m moco_mgd.training.bags ...), or leave --bingo-bags out to "
                         f"build them in --output-dir")
    if state["bags"].shape[1] != k:
        raise ValueError(f"--bingo-bags {path} holds bags of {state['bags'].shape[1]} images, not --bingo-k {k}")


def build_bags(teacher: nn.Module, images: Dataset, k: int, source: BagSource, path: str | os.PathLike,
               batch_size: int, device: torch.device, workers: int = 0, autocast_dtype: torch.dtype | None = None,
               backend: str = "faiss") -> tuple[torch.Tensor, str]:
    """The bags of ``images`` (under the evaluation transform) in ``teacher``'s eyes, written to ``path``
    unless a bag file of the same source and ``k`` is there already. Every process calls it (the
    extraction is sharded); process 0 searches and writes. Returns the bags and the file's sha256."""
    path = Path(path)
    if path.is_file():
        state = read_bags(path)
        theirs = BagSource(state["teacher_sha256"], state["images"])
        if theirs == source and state["bags"].shape[1] == k:
            logger.info(f"BINGO: bags of {len(state['bags'])} images (k={k}) from {path}")
            return state["bags"], file_sha256(path)
        logger.info(f"BINGO: {path} was built from {source.describe_difference(theirs)}: building the bags again")
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        logger.info(f"BINGO bags: teacher features of {done}/{total} images, {done / max(elapsed, 1e-9):.0f} "
                    f"images/s, eta {format_duration((total - done) * elapsed / max(done, 1))}")

    features, _ = extract_features(resnet_trunk(teacher), images, batch_size, device, workers, autocast_dtype,
                                   progress=progress)
    extracted = time.perf_counter()
    if distributed.is_main_process():
        bags = search_bags(features, k, backend)
        ckpt.save_checkpoint({"format": FORMAT, "bags": bags, "k": k, "teacher_sha256": source.teacher_sha256,
                              "images": source.images}, path)
        logger.info(f"BINGO bags: {len(bags)} images, k={k}, features {extracted - start:.1f} s, search "
                    f"{time.perf_counter() - extracted:.1f} s; written to {path}")
    distributed.barrier()
    return read_bags(path)["bags"], file_sha256(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m moco_mgd.training.bags", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", metavar="DIR", nargs="?", default="",
                        help="the training images, as main_moco_mgd.py takes them")
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--teacher-arch", default="resnet50", choices=RESNET_ARCHS)
    parser.add_argument("--teacher-checkpoint", required=True, help="the frozen teacher (MoCo-v2 layout)")
    parser.add_argument("--bingo-k", type=int, default=5, help="bag size: neighbours per image (BINGO: 5)")
    parser.add_argument("--output", required=True, help="the bag file to write (main_moco_mgd.py --bingo-bags)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument("--max-images", type=int, default=0, help="as the run's (the subset drawn with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="as the run's --seed (0 when the run gives none)")
    parser.add_argument("--val-holdout", type=float, default=0.0, help=VAL_HOLDOUT_HELP)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("-j", "--workers", type=int, default=8)
    parser.add_argument("--backend", default="faiss", choices=BACKENDS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for flag in ("bingo_k", "image_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not os.path.isfile(args.teacher_checkpoint):
        raise SystemExit(f"--teacher-checkpoint {args.teacher_checkpoint}: no such file")
    if os.path.exists(args.output):
        raise SystemExit(f"--output {args.output} exists: choose another path (nothing is overwritten)")
    images = build_dataset(args.dataset, args.data or None, "train", eval_transform(args.image_size),
                           val_holdout=args.val_holdout)
    if args.max_images:
        images = random_subset(images, args.max_images, args.seed)
    try:
        check_bag_size(args.bingo_k, len(images))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    teacher = load_frozen_teacher(args.teacher_arch, args.teacher_checkpoint, stem=args.stem).to(args.device)
    source = bag_source(args.teacher_checkpoint, args.dataset, args.data, args.val_holdout, args.max_images,
                        args.seed, args.image_size, args.stem, len(images))
    build_bags(teacher, images, args.bingo_k, source, args.output, args.batch_size, torch.device(args.device),
               args.workers, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
