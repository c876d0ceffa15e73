"""Checkpoint formats, read: a ResNet's weights from every layout a MoCo user has on disk.

Recognised checkpoint layouts (all loaded with ``torch.load(weights_only=True)``):
    * the official MoCo / this project: ``{"state_dict": {"module.encoder_q.conv1.weight", ...,
      "module.encoder_k.*", "module.queue", ...}}``, with a linear ``fc`` or the MoCo-v2
      MLP head ``fc.0`` / ``fc.2``;
    * the same without the ``module.`` prefix (a model saved without DDP);
    * a plain torchvision state dict (``conv1.weight``, ...), optionally under ``state_dict``
      or ``model`` and optionally with ``module.``.
Only the query encoder's backbone is taken; its head (``fc*``) is returned separately.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from moco_mgd.models.resnet import RESNET_ARCHS, build_resnet

__all__ = ["load_checkpoint_file", "backbone_state_dict", "guess_arch", "load_backbone_weights",
           "load_pretrained_backbone", "build_head", "load_frozen_backbone", "load_frozen_teacher",
           "check_pretraining_checkpoint"]

# Key prefixes of a query encoder, most specific first.
_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.",
                     "module.backbone.", "backbone.", "module.")
_BACKBONE_PROBE = "conv1.weight"


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Mapping:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong.

    Every file the runs load passes here (teacher, ``--pretrained``, ``--resume``, export), so a
    tensor holding NaN or inf is refused here, named with the file, before anything is built on it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist (or is not a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safety errors all mean one thing here
        raise ValueError(
            f"{what} {path!r} is not a PyTorch checkpoint that loads with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} {path!r} holds a {type(obj).__name__}, not a state dict")
    for name, tensor in _tensors(obj):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what} {path!r}: tensor {name} holds {bad} NaN or inf value(s) of {tensor.numel()}: "
                             f"the run that saved it diverged, or the file is damaged; use an earlier checkpoint")
    return obj


def _tensors(obj, name: str = ""):
    """Every tensor in a loaded checkpoint, with its path of keys (``state_dict/module.encoder_q.conv1.weight``)."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{name}/{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{name}[{index}]")


def backbone_state_dict(checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Split a checkpoint into the query encoder's backbone and head weights.

    Args:
        checkpoint: the object in a checkpoint file (see the module docstring).

    Returns:
        ``(backbone, head, layout)``: torchvision-named tensors without ``fc``, the ``fc*``
        tensors (``fc.weight`` or ``fc.0.weight`` ...), and a one-line description of the
        layout that was recognised.

    Raises:
        ValueError: no recognisable ResNet backbone; the message lists the keys found.
    """
    state = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    for prefix in _ENCODER_PREFIXES + ("",):
        if prefix + _BACKBONE_PROBE in state:
            break
    else:
        found = sorted(state.keys())
        shown = ", ".join(found[:12]) + (f", ... ({len(found)} keys)" if len(found) > 12 else "")
        raise ValueError(
            f"no ResNet backbone found: expected a key ending in {_BACKBONE_PROBE!r} under one of "
            f"{[p for p in _ENCODER_PREFIXES]} or none; found: {shown or 'no keys'}"
        )
    backbone, head = {}, {}
    for key, value in state.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            continue
        name = key[len(prefix):]
        (head if name.startswith("fc.") else backbone)[name] = value
    layout = f"query encoder under {prefix!r}" if prefix else "plain torchvision keys"
    if head:
        layout += ", MLP head" if any(k.startswith("fc.0.") for k in head) else ", linear head"
    return backbone, head, layout


def guess_arch(backbone: Mapping[str, torch.Tensor]) -> str | None:
    """The first of :data:`RESNET_ARCHS` whose backbone keys and shapes ``backbone`` matches exactly, or None."""
    for arch in RESNET_ARCHS:
        ref = {k: v.shape for k, v in build_resnet(arch).state_dict().items() if not k.startswith("fc.")}
        if ref.keys() == backbone.keys() and all(ref[k] == backbone[k].shape for k in ref):
            return arch
    return None


def load_backbone_weights(model: nn.Module, arch: str, backbone: Mapping[str, torch.Tensor],
                          source: str) -> None:
    """Load backbone weights into ``model`` strictly (``fc`` excluded).

    Raises:
        ValueError: listing missing, unexpected and mis-shaped keys, and the architecture
            the weights look like, if any.
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(expected.keys() - backbone.keys())
    unexpected = sorted(backbone.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & backbone.keys()
                       if expected[k].shape != backbone[k].shape)
    if missing or unexpected or misshaped:
        guess = guess_arch(backbone)
        hint = f"; the weights look like a {guess}: pass that architecture" if guess else ""
        raise ValueError(
            f"{source} does not fit {arch}{hint}. missing {len(missing)} keys {missing[:5]}, "
            f"unexpected {len(unexpected)} keys {unexpected[:5]}, "
            f"{len(misshaped)} with another shape {misshaped[:5]}"
        )
    model.load_state_dict(dict(backbone), strict=False)


def load_pretrained_backbone(model: nn.Module, arch: str, checkpoint_path: str | os.PathLike,
                             what: str = "checkpoint") -> tuple[dict, dict, str]:
    """Load the query-encoder backbone of a checkpoint file into ``model`` strictly (``fc`` excluded).

    Returns:
        ``(backbone, head, layout)`` as :func:`backbone_state_dict`.

    Raises:
        FileNotFoundError / ValueError: naming the file, what was found and what to change.
    """
    checkpoint = load_checkpoint_file(checkpoint_path, what=what)
    name = f"{what} {os.fspath(checkpoint_path)!r}"
    try:
        backbone, head, layout = backbone_state_dict(checkpoint)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    load_backbone_weights(model, arch, backbone, source=f"{name} ({layout})")
    return backbone, head, layout


def build_head(head: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The projection head of a checkpoint: MoCo-v2's MLP (``fc.0``, ReLU, ``fc.2``) or a linear ``fc``.

    Args:
        head: the ``fc*`` tensors of :func:`backbone_state_dict`.
        source: how to name the checkpoint in errors.

    Raises:
        ValueError: no head, or one of another shape.
    """
    if "fc.0.weight" in head and "fc.2.weight" in head:
        hidden, width = head["fc.0.weight"].shape
        dim = head["fc.2.weight"].shape[0]
        layers = [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, dim)]
        if "fc.3.running_mean" in head:  # --embedding-bn
            layers.append(nn.BatchNorm1d(dim, affine=False))
        module = nn.Sequential(*layers)
        weights = {k.removeprefix("fc."): v for k, v in head.items()}
    elif "fc.weight" in head:
        out_features, width = head["fc.weight"].shape
        module = nn.Linear(width, out_features)
        weights = {k.removeprefix("fc."): v for k, v in head.items()}
    else:
        raise ValueError(f"{source} has no projection head (no fc.* weights besides the backbone's): the embedding "
                         f"losses need the teacher's MoCo head (e.g. moco_v2_200ep_pretrain.pth.tar has one; a "
                         f"torchvision classifier's fc is removed by MoCo conversions)")
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{source}: the head weights {sorted(head)} do not form a linear or MoCo-v2 MLP head "
                         f"({str(exc).splitlines()[0]})") from None
    return module


def load_frozen_backbone(arch: str, checkpoint_path: str | os.PathLike, stem: str = "imagenet",
                         what: str = "checkpoint", with_head: bool = False) -> nn.Module:
    """A frozen ResNet (eval mode, no grad) from any known layout.

    Args:
        arch: the architecture the weights must fit (checked strictly).
        checkpoint_path: a file in one of the layouts of the module docstring.
        stem: the stem the weights were trained with.
        what: how to name the file in errors (e.g. "teacher checkpoint").
        with_head: keep the checkpoint's projection head as ``fc`` (:func:`build_head`), so
            that the model outputs its embedding; otherwise ``fc`` is the identity and it
            outputs the pooled backbone features.

    Raises:
        FileNotFoundError / ValueError: with what was found and what to change.
    """
    model = build_resnet(arch, stem=stem)
    _, head, layout = load_pretrained_backbone(model, arch, checkpoint_path, what)
    model.fc = build_head(head, f"{what} {os.fspath(checkpoint_path)!r} ({layout})") if with_head else nn.Identity()
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen_teacher(arch: str, checkpoint_path: str | os.PathLike, stem: str = "imagenet",
                        with_head: bool = False) -> nn.Module:
    """The teacher: a ResNet from a MoCo-v2 (or torchvision) checkpoint, frozen.

    MGD reads intermediate features only, so by default the head is dropped (``fc`` is the
    identity). ``with_head`` keeps the MoCo-v2 head, for the embedding losses
    (:mod:`moco_mgd.losses.embedding`): the model then outputs the teacher's embedding, and
    :func:`~moco_mgd.models.stages.forward_with_stages` still returns its stages. The returned
    model is in eval mode with ``requires_grad=False`` everywhere. Keep it out of DDP and call it under ``torch.no_grad()``.
    """
    return load_frozen_backbone(arch, checkpoint_path, stem, what="teacher checkpoint", with_head=with_head)


def check_pretraining_checkpoint(checkpoint: Mapping, path: str) -> None:
    """A MoCo pretraining checkpoint (``module.encoder_q.*``), not a linear evaluation's or a bare network's."""
    state = checkpoint.get("state_dict")
    keys = sorted(state) if isinstance(state, dict) else sorted(checkpoint)
    if isinstance(state, dict) and any(k.startswith("module.encoder_q.") for k in keys):
        return
    expected = ("--resume takes a checkpoint_NNNN.pth.tar that main_moco_mgd.py wrote (or leave it out to go on "
                "from the newest in --output-dir)")
    if "best_acc1" in checkpoint:
        raise ValueError(f"--resume {path!r} is a linear-evaluation checkpoint (main_lincls.py: a frozen backbone and "
                         f"its trained fc, best top-1 {float(checkpoint['best_acc1']):.2f}), not a pretraining one. "
                         f"{expected}; to go on with that linear evaluation, pass it to main_lincls.py --resume")
    raise ValueError(f"--resume {path!r} is not a pretraining checkpoint: it holds no MoCo query encoder "
                     f"(module.encoder_q.*; found {keys[:5]}{' ...' if len(keys) > 5 else ''}). {expected}; a "
                     f"teacher goes to --teacher-checkpoint, weights to evaluate to main_lincls.py --pretrained")
