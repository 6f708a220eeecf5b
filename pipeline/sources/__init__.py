"""Stage 1, audio: a corpus's list or folder → 16 kHz mono audio and a manifest, chunk by chunk.

Chunk jobs turn a source (the demo synthesiser, a YouTube segment list, a local folder tree) into
16 kHz mono audio and a chunk manifest (workflow/rules/sources.smk).
"""
