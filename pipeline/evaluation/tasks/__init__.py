"""Evaluation tasks, read and written.

HEAR task folders (``hear``), X-ARES shards converted to them (``xares``), the synthesised demo
tasks (``demo``) and the quick sets of the quick checks (``quick_sets``).
"""
