"""Stage 4, evaluation: task folders (HEAR format, the demo tasks), embeddings per (model, task),
the HEAR MLP probe, k-NN, score tables against the paper and plots (workflow/rules/evaluate.smk)."""
