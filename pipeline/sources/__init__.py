"""Stage 1, audio: chunk jobs that turn a source (the demo synthesiser, a YouTube segment list,
a local folder tree) into 16 kHz mono audio and a chunk manifest (workflow/rules/sources.smk)."""
