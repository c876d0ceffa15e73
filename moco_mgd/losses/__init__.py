"""The distillation losses: MGD's math and distiller, CCKD, DisCo, SEED, BINGO and their sum."""
