"""Stage 2, features: audio clips → 10 s windows of dB log-mel in Parquet shards, with a manifest.

The log-mel is the model's own front end; the dataset manifest lists every shard with its sha256
(workflow/rules/features.smk).
"""
