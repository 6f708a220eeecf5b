"""Stage 2, features: clips → 10 s windows → dB log-mel (the model's own front end) → Parquet
shards, and the dataset manifest over all shards (workflow/rules/features.smk)."""
