"""Moved to :mod:`moco_mgd.data`; this name stays only until experiments/ import from there."""
from moco_mgd.data import *  # noqa: F401,F403
from moco_mgd.data import __all__  # noqa: F401
