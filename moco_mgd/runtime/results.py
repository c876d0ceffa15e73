"""Moved to :mod:`moco_mgd.reporting.results`; this name stays only until experiments/ import from there."""
import sys

from moco_mgd.reporting import results

sys.modules[__name__] = results  # the same module object, so experiments' monkeypatches and private names still work
