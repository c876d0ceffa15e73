"""The distillation losses: MGD's math and distiller, CCKD, DisCo, SEED and their sum."""
