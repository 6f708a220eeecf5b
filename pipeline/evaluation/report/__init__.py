"""Evaluation report: the protocols' results → score tables and the comparison with the paper and
X-ARES (``results``), figures (``plots``) and the layer-wise table (``layers``)."""
