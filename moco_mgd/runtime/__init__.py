"""Around the training: processes and collectives, launch, checkpoints, data, logs, figures, results, export."""
