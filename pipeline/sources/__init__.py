"""Stage 1, audio: chunk jobs that turn a source (the demo synthesiser, a YouTube segment list,
a local folder tree, a mirror: Parquet rows, WebDataset tars, HTTP archives) into 16 kHz mono
audio and a chunk manifest, corpora whose routes fill one ID list, and the coverage report
(workflow/rules/sources.smk; docs/corpora.md)."""
