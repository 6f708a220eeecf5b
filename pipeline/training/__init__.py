"""Stage 3, training: the Dasheng MAE pre-trained with Ray Train on the shards, resumable by step.

The loader, the learning-rate schedule, step checkpoints, checkpoint averaging, the loss curve and
the quick checks while training (workflow/rules/training.smk).
"""
