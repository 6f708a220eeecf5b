"""Stage 4, evaluation: encoders scored on HEAR and X-ARES tasks, in tables against the paper.

By role (workflow/rules/evaluate.smk runs them):

- ``tasks``: the task folders (HEAR format): the reader, X-ARES shards converted to it, the
  synthesised demo tasks, and the quick sets of the quick checks;
- ``embeddings``: frame and clip embeddings per (model, task);
- ``protocols``: the scores on frozen embeddings (HEAR's MLP probe, the paper's k-NN, X-ARES's MLP
  and k-NN), from one split loader;
- ``metrics``: HEAR's metrics, shared by the task reader, the protocols and the report;
- ``report``: the score tables, the comparison with the paper and X-ARES, the plots and the
  layer-wise table.
"""
