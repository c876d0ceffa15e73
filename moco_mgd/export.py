"""``python -m moco_mgd.export``, the command users type; the code is :mod:`moco_mgd.checkpoints.export`."""
from moco_mgd.checkpoints.export import main

if __name__ == "__main__":
    main()
