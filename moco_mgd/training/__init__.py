"""Pretraining: the configuration, the schedules, one training step and epoch, the run."""
