"""Evaluation of a frozen backbone: feature extraction, the kNN monitor, MoCo's linear protocol."""
