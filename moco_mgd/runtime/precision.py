"""The ``--amp`` choices and the autocast dtype each one means on a device."""
from __future__ import annotations

import torch

__all__ = ["AMP_MODES", "autocast_dtype"]

# "auto": bf16 on a GPU that has it (else fp16), off on CPU, where autocast is slower than fp32.
AMP_MODES = ("auto", "bf16", "fp16", "off")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` (one of :data:`AMP_MODES`) on ``device``; None: autocast off."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown --amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
