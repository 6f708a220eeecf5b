"""What every stage shares: atomic writes, provenance stamps, ffmpeg audio decoding, chunk
manifests, PNG figures, strict config sections and the entry points' logging set-up."""
