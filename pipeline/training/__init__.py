"""Stage 3, training: Dasheng MAE pre-training with Ray Train from the shards — the loader, the
learning-rate schedule, checkpoint averaging and the loss curve (workflow/rules/training.smk)."""
