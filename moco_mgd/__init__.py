"""moco-mgd: MoCo-v2 pretraining with Matching Guided Distillation."""
