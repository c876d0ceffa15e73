"""Range checks of the numeric command-line flags, one table per entry script.

Each entry script's check (:func:`moco_mgd.training.checks.validate`, :func:`moco_mgd.evaluation.lincls.check_config`,
and :func:`moco_mgd.runtime.launch.run_main` for the launch flags) lists its flags as
``(flag, value, condition, what is allowed)`` rows and hands them to :func:`check_numbers`, which
runs before any process starts or any file is written.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["check_numbers", "training_rules", "POSITIVE", "AT_LEAST_1", "NON_NEGATIVE", "IN_0_1", "IN_0_1_OPEN", "SEED",
           "EPOCH_LIST"]

Rule = tuple[str, Any, Callable[[Any], bool], str]

# (condition, what is allowed): the allowed part of the message, "FLAG VALUE: must be ...".
POSITIVE = (lambda v: v > 0, "positive")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
IN_0_1 = (lambda v: 0 <= v <= 1, "in [0, 1]")
IN_0_1_OPEN = (lambda v: 0 <= v < 1, "in [0, 1)")
SEED = (lambda v: 0 <= v < 2 ** 32, "in [0, 4294967295] (numpy's seeds)")
EPOCH_LIST = (lambda v: all(e >= 0 for e in v), "epochs >= 0")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_numbers(rules: Iterable[Rule]) -> None:
    """Raise ValueError naming the first flag whose value breaks its rule (``None``: flag not given, skipped).

    A float must also be finite (argparse's ``float`` accepts ``nan`` and ``inf``).
    """
    for flag, value, ok, allowed in rules:
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be finite and {allowed}")
        if not ok(value):
            raise ValueError(f"{flag} {_shown(value)}: must be {allowed}")


def training_rules(c: Any) -> list[Rule]:
    """The rows of the flags both entry scripts share (MoCo's SGD, schedule and loader flags);
    ``c`` is either script's configuration."""
    return [
        ("-j/--workers", c.workers, *NON_NEGATIVE), ("--epochs", c.epochs, *AT_LEAST_1),
        ("--start-epoch", c.start_epoch, lambda v: 0 <= v < c.epochs, f">= 0 and < --epochs ({c.epochs})"),
        ("-b/--batch-size", c.batch_size, *AT_LEAST_1), ("--lr", c.lr, *POSITIVE),
        ("--schedule", c.schedule, *EPOCH_LIST), ("--momentum", c.momentum, *IN_0_1_OPEN),
        ("--wd/--weight-decay", c.weight_decay, *NON_NEGATIVE), ("-p/--print-freq", c.print_freq, *NON_NEGATIVE),
        ("--seed", c.seed, *SEED), ("--image-size", c.image_size, *AT_LEAST_1),
        ("--max-images", c.max_images, NON_NEGATIVE[0], ">= 0 (0: all images)"),
    ]
