"""Evaluation protocols: a task's frozen embeddings turned into scores.

``hear_mlp``: HEAR's MLP probe, ``knn``: the paper's k-NN, ``xares``: X-ARES's MLP and k-NN; all
read a task's embeddings through one split loader (``inputs``).
"""
