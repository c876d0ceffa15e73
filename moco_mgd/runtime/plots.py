"""Moved to :mod:`moco_mgd.reporting.plots`; this name stays only until experiments/ import from there."""
import sys

from moco_mgd.reporting import plots

sys.modules[__name__] = plots  # the same module object, so experiments' monkeypatches and private names still work
