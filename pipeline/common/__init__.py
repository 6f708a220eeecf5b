"""What every stage shares: atomic writes, provenance, audio decoding, manifests, config, logs.

Atomic writes, provenance stamps, ffmpeg audio decoding, chunk manifests, PNG figures, the config
schema's defaults, strict config sections and the entry points' logging set-up.
"""
