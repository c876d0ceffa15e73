"""Take the student out: a checkpoint's backbone as torchvision, timm or detectron2 weights.

``python -m moco_mgd.export CKPT --to torchvision|timm|detectron2 -o OUT`` reads any layout of
:mod:`moco_mgd.checkpoints.formats` (this project's pretraining and linear-eval checkpoints, MoCo's, torchvision's)
and keeps the query encoder's backbone only:

    torchvision, timm  a plain state dict (timm's ResNets have torchvision's names), with ``fc`` only when
                       it is a trained classifier (linear-eval, supervised): ``resnet18(num_classes=N)``
                       loads it strictly. Otherwise ``fc`` is absent: set ``model.fc = nn.Identity()``
                       (timm: ``num_classes=0``), load strictly, and the model outputs pooled features.
                       ``--keep-head`` writes MoCo's projection head apart (``OUT`` suffixed ``.head.pth``).
    detectron2         the pickle of MoCo's convert-pretrain-to-detectron2.py, in detectron2's names,
                       without ``fc`` or ``num_batches_tracked``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from moco_mgd.checkpoints.formats import backbone_state_dict, guess_arch, load_backbone_weights, load_checkpoint_file
from moco_mgd.models.resnet import BASIC_BLOCK_ARCHS, RESNET_ARCHS, STEMS, build_resnet

__all__ = ["TARGETS", "detectron2_name", "to_detectron2", "weights_stem", "resolve_arch", "dropped_groups",
           "head_path", "main"]

TARGETS = ("torchvision", "timm", "detectron2")

# torchvision -> detectron2, applied in order to a name that already has its ``res``/``stem.`` prefix.
_D2_RULES = ((re.compile(r"(^|\.)bn([1-3])\."), r"\1conv\2.norm."),
             (re.compile(r"\.downsample\.0\."), ".shortcut."),
             (re.compile(r"\.downsample\.1\."), ".shortcut.norm."))
# detectron2's MODEL.RESNETS settings beyond DEPTH (its bottleneck width is NUM_GROUPS x WIDTH_PER_GROUP).
_D2_CONFIG = {"resnet18": {"RES2_OUT_CHANNELS": 64}, "resnet34": {"RES2_OUT_CHANNELS": 64},
              "resnext50_32x4d": {"NUM_GROUPS": 32, "WIDTH_PER_GROUP": 4},
              "resnext101_32x8d": {"NUM_GROUPS": 32, "WIDTH_PER_GROUP": 8},
              "wide_resnet50_2": {"WIDTH_PER_GROUP": 128}, "wide_resnet101_2": {"WIDTH_PER_GROUP": 128}}
# MoCo's detection configs: torchvision's RGB ImageNet normalisation, and the stride in the 3x3 conv.
_D2_PIXELS = ('MODEL.PIXEL_MEAN "[123.675, 116.280, 103.530]" MODEL.PIXEL_STD "[58.395, 57.120, 57.375]" '
              "INPUT.FORMAT RGB MODEL.RESNETS.STRIDE_IN_1X1 False")
# Top-level checkpoint entries, as the report names them.
_ENTRY_NAMES = {"mgd": "MGD state", "embedding": "embedding-loss state", "scaler": "AMP scaler", "rng": "RNG state"}


def detectron2_name(name: str) -> str:
    """detectron2's name of a torchvision ResNet tensor: ``layer3.0.bn2.weight`` -> ``res4.0.conv2.norm.weight``.

    ``layerN`` is ``res{N+1}``, the rest goes under ``stem.``; ``bnK`` is ``convK.norm``, ``downsample.0``/``.1``
    are ``shortcut``/``shortcut.norm``: the same rules for BasicBlock and Bottleneck.
    """
    match = re.match(r"layer([1-4])\.", name)
    name = f"res{int(match.group(1)) + 1}.{name[match.end():]}" if match else f"stem.{name}"
    for pattern, replacement in _D2_RULES:
        name = pattern.sub(replacement, name)
    return name


def to_detectron2(backbone: Mapping[str, torch.Tensor]) -> dict:
    """The detectron2 weights file of a backbone (torchvision names, no ``fc``).

    Returns:
        ``{"model": {detectron2 name: numpy array}, "__author__": "moco-mgd", "matching_heuristics": True}``;
        ``num_batches_tracked`` is left out (detectron2's FrozenBN has none).
    """
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in backbone.items()
             if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "moco-mgd", "matching_heuristics": True}


def weights_stem(backbone: Mapping[str, torch.Tensor]) -> str:
    """``"small"`` when ``conv1`` is 3x3 (:func:`moco_mgd.models.resnet.apply_small_stem`), else ``"imagenet"``."""
    return "small" if tuple(backbone["conv1.weight"].shape[-2:]) == (3, 3) else "imagenet"


def resolve_arch(backbone: Mapping[str, torch.Tensor], arch: str | None, stem: str, source: str) -> str:
    """The architecture of the weights: ``arch`` checked strictly against them, or guessed from them.

    Raises:
        ValueError: the weights do not fit ``arch`` (or any architecture when guessing).
    """
    if arch is None:
        probe = dict(backbone)
        if stem == "small":  # guess_arch compares with ImageNet stems: show it a 7x7 conv1 of the same width
            probe["conv1.weight"] = torch.empty(*backbone["conv1.weight"].shape[:2], 7, 7, device="meta")
        arch = guess_arch(probe)
        if arch is None:
            raise ValueError(f"{source}: the weights fit none of {', '.join(RESNET_ARCHS)}; pass -a/--arch "
                             f"to see what does not fit")
    load_backbone_weights(build_resnet(arch, stem=stem), arch, backbone, source)
    return arch


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nest of mappings, lists and tuples."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return [value] if isinstance(value, torch.Tensor) else [t for item in items for t in _tensors(item)]


def _state_group(key: str) -> str:
    """The report's group of a state-dict key that is not exported."""
    if "encoder_k." in key:
        return "encoder_k"
    if key.rsplit(".", 1)[-1].startswith("queue"):
        return "queue"
    return "head fc.*" if key.startswith("fc.") or ".fc." in key else key


def dropped_groups(checkpoint: Mapping, kept: Iterable[torch.Tensor]) -> tuple[Counter, list[str]]:
    """What of ``checkpoint`` is not in ``kept``, for the report.

    The state dict is the entry holding the kept tensors (found by identity: the layout rules stay in
    :func:`moco_mgd.checkpoints.formats.backbone_state_dict`); its other keys are grouped by :func:`_state_group`.
    Other entries are one group each (``optimizer``, ``MGD state``: shown even with 0 tensors), or
    metadata when they hold plain values only (``epoch``, ``config``).

    Returns:
        ``(groups, metadata)``: ``{group: number of tensors}`` and the names of the metadata entries.
    """
    kept_ids = {id(t) for t in kept}
    groups, metadata = Counter(), []

    def holds_kept(value) -> bool:
        return isinstance(value, Mapping) and any(id(t) in kept_ids for t in value.values())

    for key, value in ({"": checkpoint} if holds_kept(checkpoint) else checkpoint).items():
        if value is None:  # "mgd": None is a run without MGD
            continue
        if holds_kept(value):  # the state dict
            groups.update(_state_group(k) for k, v in value.items()
                          if isinstance(v, torch.Tensor) and id(v) not in kept_ids)
        elif (found := _tensors(value)) or key in _ENTRY_NAMES or key == "optimizer":
            groups[_ENTRY_NAMES.get(key, key)] += len(found)
        else:
            metadata.append(key)
    return groups, metadata


def head_path(out: str | os.PathLike) -> Path:
    """Where ``--keep-head`` writes the projection head: ``OUT`` with suffix ``.head.pth``."""
    return Path(out).with_suffix(".head.pth")


def _check_output(path: Path, force: bool) -> str | None:
    """Why ``path`` cannot be written (None if it can), checked before any work."""
    if not path.parent.is_dir():
        return f"output directory {str(path.parent)!r} does not exist: create it or pass another -o"
    if path.is_dir():
        return f"output {str(path)!r} is a directory: pass a file name, e.g. -o {path / 'student.pth'}"
    if path.exists() and not force:
        return f"output {str(path)!r} exists: pass --force to overwrite it, or another -o"
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".export-write-test-"):
            pass
    except OSError as exc:
        return f"output directory {str(path.parent)!r} cannot be written ({exc.strerror}): pass another -o"
    return None


def _write_atomic(path: Path, dump) -> None:
    """``dump(file)`` into a temporary file next to ``path``, renamed over it: never a half-written OUT."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _how_to_load(target: str, arch: str, stem: str, out: Path, num_classes: int | None, width: int) -> str:
    """The lines a user runs to load ``out`` in ``target``."""
    if target == "detectron2":
        extra = "".join(f" MODEL.RESNETS.{k} {v}" for k, v in _D2_CONFIG.get(arch, {}).items())
        line = (f"  train_net.py --config-file CONFIG MODEL.WEIGHTS {out} {_D2_PIXELS} "
                f"MODEL.RESNETS.DEPTH {re.search(r'[0-9]+', arch).group()}{extra}")
        basic = arch in BASIC_BLOCK_ARCHS  # detectron2 builds BasicBlocks in the backbone only
        return line + ("\n  with an FPN CONFIG: a C4 config's res5 head is made of bottleneck blocks" if basic else "")
    if target == "timm":
        lines = ["import timm, torch",
                 f"model = timm.create_model({arch!r}, pretrained=False, num_classes={num_classes or 0})"]
    else:
        lines = ["import torch, torchvision",
                 f"model = torchvision.models.{arch}({f'num_classes={num_classes}' if num_classes else ''})"]
        if not num_classes:
            lines.append("model.fc = torch.nn.Identity()  # no classifier was trained: outputs pooled features")
    if stem == "small":  # the weights need the small-image stem (moco_mgd.models.resnet.apply_small_stem)
        lines += [f"model.conv1 = torch.nn.Conv2d(3, {width}, kernel_size=3, stride=1, padding=1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    lines.append(f"model.load_state_dict(torch.load({str(out)!r}))")
    return "\n".join("  " + line for line in lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moco_mgd.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint in any layout moco_mgd.models.resnet reads")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the library that will load OUT")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    parser.add_argument("-a", "--arch", choices=RESNET_ARCHS, metavar="ARCH",
                        help=f"{', '.join(RESNET_ARCHS)}; checked against the weights (default: guessed from them)")
    parser.add_argument("--stem", choices=STEMS, help="default: read from conv1 (3x3: small)")
    parser.add_argument("--keep-head", action="store_true", help="also write the MoCo head to OUT.head.pth")
    parser.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    return parser


def _load(parser: argparse.ArgumentParser, path: str) -> tuple[Mapping, dict, dict, str]:
    """The checkpoint and its ``(backbone, head, layout)``; exits 2 naming the file and what it holds."""
    try:
        checkpoint = load_checkpoint_file(path)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"{exc}: pass a MoCo, moco-mgd or torchvision checkpoint")
    try:
        return (checkpoint, *backbone_state_dict(checkpoint))
    except ValueError as exc:
        parser.error(f"checkpoint {path!r}: {exc}: pass a checkpoint of a ResNet (MoCo, moco-mgd or torchvision)")


def _check_stem(parser: argparse.ArgumentParser, args: argparse.Namespace, stem: str, source: str) -> None:
    """Exit 2 when --stem contradicts conv1, or when the target cannot build the weights' stem."""
    if args.stem and args.stem != stem:
        parser.error(f"--stem {args.stem}, but {source} has a {stem}-stem conv1 (kernel "
                     f"{'3x3' if stem == 'small' else '7x7'}): pass --stem {stem} or leave --stem out")
    if stem == "small" and args.to == "detectron2":
        parser.error(f"{source} has the small stem (3x3 stride-1 conv1, no max-pool), and detectron2's ResNet stem "
                     f"is fixed (7x7 stride-2 conv1 + max-pool): export --to torchvision or timm instead, or "
                     f"pretrain with --stem imagenet")


def _write(target: str, out: Path, backbone: dict, fc: dict) -> int:
    """Write ``out`` for ``target`` atomically; returns the number of backbone tensors in it."""
    if target == "detectron2":
        exported = to_detectron2(backbone)
        _write_atomic(out, lambda f: pickle.dump(exported, f))
        return len(exported["model"])
    state = {k: v.clone() for k, v in {**backbone, **fc}.items()}  # clones: a view would save its whole storage
    _write_atomic(out, lambda f: torch.save(state, f))
    return len(backbone)


def main(argv: list[str] | None = None) -> Path:
    """Export a checkpoint's student backbone; every bad input exits 2 with the problem and the fix.

    Returns:
        the path written.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.to == "detectron2" and out.suffix != ".pkl":  # detectron2 unpickles only files named *.pkl
        parser.error(f"-o {out}: detectron2 reads a weights pickle only from a *.pkl file: "
                     f"pass -o {out.with_suffix('.pkl')}")
    for path in [out] + ([head_path(out)] if args.keep_head else []):
        if problem := _check_output(path, args.force):  # before loading: a bad -o should fail fast
            parser.error(problem)
    checkpoint, backbone, head, layout = _load(parser, args.checkpoint)
    source = f"checkpoint {args.checkpoint!r} ({layout})"
    stem = weights_stem(backbone)
    _check_stem(parser, args, stem, source)
    try:
        arch = resolve_arch(backbone, args.arch, stem, source)
    except ValueError as exc:
        parser.error(str(exc))
    groups, metadata = dropped_groups(checkpoint, [*backbone.values(), *head.values()])
    # A linear fc outside a MoCo model (no key encoder, no queue) is a trained classifier; MoCo's fc projects.
    classifier = set(head) == {"fc.weight", "fc.bias"} and not {"encoder_k", "queue"} & groups.keys()
    keep_fc = classifier and args.to != "detectron2"
    kind = "linear classifier" if classifier else "MoCo-v2 MLP head" if "fc.0.weight" in head else "projection head"
    if args.keep_head and (keep_fc or not head):
        parser.error(f"--keep-head: {source} has no head to write apart "
                     f"({'its fc is a classifier, kept in OUT' if head else 'no fc.* weights'}): drop --keep-head")
    kept = _write(args.to, out, backbone, head if keep_fc else {})
    print(f"exported {source} as {arch} ({stem} stem) for {args.to}: {out}")
    print(f"  kept: {kept} backbone tensors" + (f" + fc ({kind}, {len(head)} tensors)" if keep_fc else ""))
    if args.keep_head:
        _write_atomic(head_path(out), lambda f: torch.save({k: v.clone() for k, v in head.items()}, f))
        print(f"  kept: the {kind} ({len(head)} tensors: {', '.join(sorted(head))}) in {head_path(out)}")
    elif head and not keep_fc:
        groups["head fc.*"] += len(head)
    if kept < len(backbone):  # detectron2's FrozenBN has no batch counter
        groups["num_batches_tracked"] += len(backbone) - kept
    print("  dropped: " + (", ".join(f"{name} ({n} tensors)" for name, n in groups.items()) or "nothing")
          + (f"; metadata {', '.join(metadata)}" if metadata else ""))
    num_classes = head["fc.weight"].shape[0] if keep_fc else None
    print(f"load it with:\n{_how_to_load(args.to, arch, stem, out, num_classes, backbone['conv1.weight'].shape[0])}")
    return out


if __name__ == "__main__":
    main()
