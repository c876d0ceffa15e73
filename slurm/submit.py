#!/usr/bin/env python
"""``python slurm/submit.py pretrain|lincls ...``: submit to SLURM with submitit (also the ``moco-mgd-submit`` command).

The launcher is :mod:`moco_mgd.runtime.slurm`; ``--help`` there lists every flag.
"""
from moco_mgd.runtime.slurm import main

if __name__ == "__main__":
    main()
