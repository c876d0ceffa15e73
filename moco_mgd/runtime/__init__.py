"""Around the training: processes and collectives, launch, loader workers, stopping on a signal, precision, logs."""
