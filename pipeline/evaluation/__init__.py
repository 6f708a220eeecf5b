"""Stage 4, evaluation: encoders scored on HEAR and X-ARES tasks, in tables against the paper.

Task folders (HEAR format, the demo tasks, X-ARES shards), embeddings per (model, task), the HEAR
MLP probe, k-NN, the X-ARES protocols, the layer-wise table, score tables against the paper and
plots (workflow/rules/evaluate.smk).
"""
