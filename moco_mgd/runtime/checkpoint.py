"""Moved to :mod:`moco_mgd.checkpoints.files`; this name stays only until experiments/ import from there."""
import sys

from moco_mgd.checkpoints import files

sys.modules[__name__] = files  # the same module object, so experiments' monkeypatches still reach it
