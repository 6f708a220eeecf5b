"""``http_archive`` source: tar archives of audio files on an HTTP(S) server, each with a sha256,
as MTG-Jamendo's own download script fetches its release (``raw_30s_audio-00.tar`` ... with
``data/download/raw_30s_audio_sha256_tars.txt`` of the mtg-jamendo-dataset repository).

The archives: ``archives`` (a list of ``{url, sha256}``) and/or ``checksums`` (a ``sha256sum``-style
file, ``<sha256> <file name>`` per line) whose names are joined to ``base_url``. A chunk is
``archives_per_chunk`` archives. Each archive is downloaded into ``downloads/<source>/`` with
resume (HTTP Range: a killed or cut transfer continues where it stopped), and checked against its
sha256 before use; a mismatch is downloaded once more, then the archive is rejected with the reason
(its tracks stay missing; the run goes on). Members are audio files (``extensions``); a member's
ID is its path without the extension (``00/1000`` for ``00/1000.mp3``), or ``id_regex``'s match.

``python -m dasheng_pipeline.sources.http_archive chunk ...`` runs one chunk (see
:mod:`dasheng_pipeline.sources.mirror`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from dasheng_pipeline.sources import mirror, remote, tars

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def read_checksums(path: str) -> list[tuple[str, str]]:
    """(sha256, file name) rows of a sha256sum-style file (``*`` binary marks allowed)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or not _SHA256.match(parts[0]):
                raise ValueError(
                    f"{path} line {line_no}: expected '<sha256> <file name>', got {line.strip()[:80]!r}"
                )
            out.append((parts[0].lower(), parts[1].strip().lstrip("*")))
    return out


def list_archives(src: dict) -> list[dict]:
    """The source's archives as ``{"url", "sha256"}``, in config order (known at DAG time)."""
    out = [{"url": a["url"], "sha256": a["sha256"].lower()} for a in src["archives"]]
    if src.get("checksums"):
        base = src["base_url"]
        if not base:
            raise ValueError("base_url is required with checksums (the folder the names are in)")
        base = base if base.endswith("/") else base + "/"
        out += [
            {"url": base + name, "sha256": sha} for sha, name in read_checksums(src["checksums"])
        ]
    seen = {}
    for a in out:
        seen.setdefault(a["url"], a)
    return list(seen.values())


def items(
    src: dict, archives: list[dict], download_dir: Path
) -> Iterator[mirror.Item | mirror.Problem]:
    opts = remote.HttpOptions.from_config(src)
    as_tar = {**src, "json": "ignore", "label_field": None}
    for archive in archives:
        url = archive["url"]
        dest = download_dir / remote.local_name(url)
        try:
            path = remote.download(url, dest, opts, sha256=archive["sha256"])
        except remote.FetchError as exc:
            yield mirror.Problem(url, "rejected" if exc.permanent else "failed", str(exc))
            continue
        yield from tars.read_shard(path, url.rsplit("/", 1)[-1], as_tar)
        if not src["keep_downloads"]:
            mirror.cleanup(path)


def main(argv: list[str] | None = None) -> None:
    mirror.chunk_main(
        argv, "python -m dasheng_pipeline.sources.http_archive", __doc__.split("\n\n")[0], items
    )


if __name__ == "__main__":
    main()
