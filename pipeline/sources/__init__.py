"""Stage 1, audio: a corpus's list, folder or mirror → 16 kHz mono audio and a manifest, chunk by chunk.

Chunk jobs turn a source (the demo synthesiser, a YouTube segment list, a local folder tree, a
mirror: Parquet rows, WebDataset tars, HTTP archives) into 16 kHz mono audio and a chunk manifest;
corpora fill one ID list from several routes, and one job writes the coverage report
(workflow/rules/sources.smk, docs/corpora.md).
"""
