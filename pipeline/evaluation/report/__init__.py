"""Evaluation report: the protocols' results turned into tables and figures.

The score tables and the comparison with the paper and X-ARES (``results``), the figures
(``plots``) and the layer-wise table (``layers``).
"""
