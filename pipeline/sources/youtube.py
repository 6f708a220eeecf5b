"""YouTube source: download one chunk of a segment list with the yt-dlp Python API.

One job per chunk of N list rows (``python -m dasheng_pipeline.sources.youtube chunk ...``). For every row:

* invalid rows (bad ID or times, duplicates) are ``rejected`` with the reason;
* a clip already on disk from an earlier run is reused (``note: cached``) — never downloaded twice;
* otherwise the segment is downloaded (only the segment, through yt-dlp's ffmpeg range download,
  where ``segment_download`` is on and the site allows it), with a socket timeout, a hard
  per-attempt timeout (the attempt runs in a child process that is killed when it stalls),
  bounded retries with exponential back-off (a server's ``Retry-After`` is honoured) for
  transient errors (timeouts, resets, HTTP 408/429/5xx), and none for permanent ones
  (404, private or removed videos): those end as ``failed`` rows, not as a failed job;
* with ``audio.keep_audio`` the audio is converted to 16 kHz mono FLAC, otherwise the download
  is kept as it came and the mel step decodes the segment from it.

The index job (``python -m dasheng_pipeline.sources.youtube index ...``) scans the list once for chunk byte
offsets and duplicates, so that each chunk job reads only its own rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dasheng_pipeline.common import atomic, audio, logs, manifest, provenance
from dasheng_pipeline.sources import lists

log = logging.getLogger(__name__)

# A download may be this much shorter than its segment (codec frame boundaries).
INCOMPLETE_TOLERANCE_S = 0.5
PERMANENT_MARKERS = (
    "private video",
    "video unavailable",
    "has been removed",
    "not available",
    "account associated",
    "copyright",
    "sign in to confirm your age",
    "unsupported url",
    "no video formats",
    "is not a valid url",
)


@dataclass(frozen=True)
class FetchOptions:
    url_template: str
    retries: int
    backoff_s: float
    max_backoff_s: float
    socket_timeout_s: float
    attempt_timeout_s: float
    rate_limit: str | None
    sleep_between_s: float
    cookies: str | None
    segment_download: bool

    @classmethod
    def from_config(cls, src: dict) -> FetchOptions:
        return cls(
            url_template=src["url_template"],
            retries=int(src["retries"]),
            backoff_s=float(src["backoff_s"]),
            max_backoff_s=float(src["max_backoff_s"]),
            socket_timeout_s=float(src["socket_timeout_s"]),
            attempt_timeout_s=float(src["attempt_timeout_s"]),
            rate_limit=src["rate_limit"],
            sleep_between_s=float(src["sleep_between_s"]),
            cookies=src["cookies"],
            segment_download=bool(src["segment_download"]),
        )


def parse_rate(text: str | None) -> int | None:
    """'500K' -> 512000 bytes/s (yt-dlp's ``ratelimit``)."""
    if not text:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    number = text[:-1] if text[-1].upper() in "KMG" else text
    return int(float(number) * scale)


# --------------------------------------------------------------------------- one attempt


def _classify(exc: BaseException) -> dict:
    """Turn a yt-dlp error into {transient, reason, retry_after}."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError

    cause = getattr(exc, "exc_info", None)
    cause = cause[1] if cause and len(cause) > 1 else exc
    message = str(exc).removeprefix("ERROR: ").strip()
    if isinstance(cause, HTTPError):
        status = cause.status
        retry_after = None
        with contextlib.suppress(Exception):
            value = cause.response.headers.get("Retry-After")
            retry_after = float(value) if value is not None else None
        transient = status in (408, 425, 429) or status >= 500
        return {
            "transient": transient,
            "reason": f"HTTP {status} {cause.reason or ''}".strip(),
            "retry_after": retry_after,
        }
    if isinstance(cause, TransportError):
        return {"transient": True, "reason": f"network error: {cause}", "retry_after": None}
    lowered = message.lower()
    if any(marker in lowered for marker in PERMANENT_MARKERS):
        return {"transient": False, "reason": message[:300], "retry_after": None}
    # ffmpeg range downloads report network trouble only as a non-zero exit.
    return {"transient": True, "reason": message[:300] or type(exc).__name__, "retry_after": None}


def _download(url: str, start_s: float, end_s: float, workdir: str, opts: FetchOptions) -> dict:
    """Run yt-dlp once (in the child process). Returns the result dict."""
    import yt_dlp
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
    from yt_dlp.utils import download_range_func

    exe = audio.ffmpeg_exe()
    FFmpegPostProcessor._ffmpeg_location.set(exe)  # the API does not set it for range downloads

    class _Quiet:
        def debug(self, msg):
            pass

        def info(self, msg):
            pass

        def warning(self, msg):
            pass

        def error(self, msg):
            pass

    params = {
        "format": "bestaudio/best",
        "outtmpl": {"default": os.path.join(workdir, "media.%(ext)s")},
        "paths": {"home": workdir, "temp": workdir},
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _Quiet(),
        "socket_timeout": opts.socket_timeout_s,
        "retries": 0,
        "fragment_retries": 0,
        "extractor_retries": 0,
        "file_access_retries": 0,
        "ffmpeg_location": exe,
        "noplaylist": True,
        "cachedir": False,
        "overwrites": True,
        "external_downloader_args": {
            "ffmpeg_i": ["-rw_timeout", str(int(opts.socket_timeout_s * 1e6))]
        },
    }
    if opts.rate_limit:
        params["ratelimit"] = parse_rate(opts.rate_limit)
    if opts.cookies:
        params["cookiefile"] = opts.cookies
    if opts.segment_download:
        params["download_ranges"] = download_range_func(None, [(start_s, end_s)])
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except Exception as exc:  # yt-dlp raises DownloadError (and occasionally others)
        return {"ok": False, **_classify(exc)}
    if not info:
        return {
            "ok": False,
            "transient": False,
            "reason": "yt-dlp returned no information",
            "retry_after": None,
        }
    requested = (info.get("requested_downloads") or [{}])[0]
    path = requested.get("filepath") or requested.get("_filename")
    if not path or not os.path.isfile(path):
        return {
            "ok": False,
            "transient": True,
            "reason": "download produced no file",
            "retry_after": None,
        }
    sectioned = requested.get("section_start") is not None or info.get("section_start") is not None
    return {
        "ok": True,
        "path": path,
        "sectioned": bool(sectioned),
        "media_duration": info.get("duration"),
    }


def _child(conn, url, start_s, end_s, workdir, opts) -> None:
    os.setpgrp()  # own process group: a timeout kills ffmpeg grandchildren too
    try:
        result = _download(url, start_s, end_s, workdir, opts)
    except BaseException as exc:  # never leave the parent without an answer
        result = {
            "ok": False,
            "transient": True,
            "reason": f"{type(exc).__name__}: {exc}",
            "retry_after": None,
        }
    conn.send(result)
    conn.close()


def _context():
    """Attempts start from a fork server (a clean single-threaded process with yt-dlp already
    imported): safe while several download threads run, and cheap."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dasheng_pipeline.sources.youtube", "yt_dlp"])
    return ctx


def attempt(url: str, start_s: float, end_s: float, workdir: str, opts: FetchOptions) -> dict:
    """One download attempt in a child process, killed after ``attempt_timeout_s``."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(sender, url, start_s, end_s, workdir, opts), daemon=True
    )
    proc.start()
    sender.close()
    result = None
    if receiver.poll(opts.attempt_timeout_s):
        with contextlib.suppress(EOFError):
            result = receiver.recv()
    receiver.close()
    if result is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        result = {
            "ok": False,
            "transient": True,
            "retry_after": None,
            "reason": f"timed out: no complete download within {opts.attempt_timeout_s:g} s",
        }
    proc.join(5)
    return result


# --------------------------------------------------------------------------- one clip


def backoff_delay(opts: FetchOptions, attempt_no: int, retry_after: float | None) -> float:
    delay = min(opts.max_backoff_s, opts.backoff_s * 2**attempt_no)
    if retry_after is not None:
        delay = max(delay, min(retry_after, opts.max_backoff_s))
    return delay


def cached(dest: Path, clip_id: str, keep_audio: bool) -> dict | None:
    """The stored result of an earlier successful run for this clip, if any."""
    name = manifest.storage_name(clip_id)
    if keep_audio:
        flac = dest / f"{name}.flac"
        return (
            {"audio": str(flac), "audio_offset_s": 0.0, "audio_duration_s": None}
            if flac.is_file()
            else None
        )
    meta = dest / f"{name}.json"
    if meta.is_file():
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(meta.read_text())
            if (dest / info["file"]).is_file():
                return {
                    "audio": str(dest / info["file"]),
                    "audio_offset_s": info["offset_s"],
                    "audio_duration_s": info["duration_s"],
                }
    return None


def fetch_clip(
    seg: lists.Segment,
    dest: Path,
    opts: FetchOptions,
    keep_audio: bool,
    rules: audio.ClipRules,
    sleep=time.sleep,
) -> dict:
    """Obtain one segment; returns its manifest row."""
    base = {
        "row": seg.row,
        "ytid": seg.ytid,
        "start_s": seg.start_s,
        "end_s": seg.end_s,
        "labels": seg.labels,
    }
    if seg.error:
        return manifest.clip(
            seg.clip_id if seg.ytid else f"row{seg.row}", "rejected", seg.error, **base
        )
    clip_id = seg.clip_id
    hit = cached(dest, clip_id, keep_audio)
    if hit:
        return manifest.clip(clip_id, "ok", note="cached", attempts=0, **base, **hit)

    url = opts.url_template.replace("{id}", seg.ytid)
    name = manifest.storage_name(clip_id)
    for attempt_no in range(opts.retries + 1):
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}{atomic.TEMP_MARK}") as workdir:
            result = attempt(url, seg.start_s, seg.end_s, workdir, opts)
            if result["ok"]:
                row = _store(clip_id, result, dest, seg, keep_audio, rules, attempt_no + 1, base)
                if row is not None:
                    return row
                result = {
                    "ok": False,
                    "transient": True,
                    "retry_after": None,
                    "reason": result["incomplete"],
                }
        if not result["transient"] or attempt_no == opts.retries:
            break
        sleep(backoff_delay(opts, attempt_no, result.get("retry_after")))
    attempts = attempt_no + 1
    kind = "transient" if result["transient"] else "permanent"
    return manifest.clip(
        clip_id,
        "failed",
        f"{result['reason']} ({kind}; {attempts} attempt(s))",
        attempts=attempts,
        **base,
    )


def _store(
    clip_id: str,
    result: dict,
    dest: Path,
    seg: lists.Segment,
    keep_audio: bool,
    rules: audio.ClipRules,
    attempts: int,
    base: dict,
) -> dict | None:
    """Check a finished download and move it into the audio store (as FLAC with keep_audio).
    Returns the manifest row, or None (with ``result["incomplete"]`` set) to retry."""
    name = manifest.storage_name(clip_id)
    # A segment download starts at the segment; a whole-file download is cut here.
    offset = 0.0 if result["sectioned"] else seg.start_s
    duration = seg.end_s - seg.start_s
    note = (
        "segment downloaded"
        if result["sectioned"]
        else "whole file downloaded, segment cut locally"
    )
    samples, reason, extra = audio.load_clip(
        result["path"], rules, start_s=offset or None, duration_s=duration
    )
    if samples is None:
        if reason.startswith(("silent", "too short", "too long")):
            return manifest.clip(clip_id, "rejected", reason, attempts=attempts, note=note, **base)
        # A connection reset mid-transfer can leave a file that does not decode: try again.
        result["incomplete"] = f"downloaded file {reason}"
        return None
    # A connection closed mid-transfer can look like a clean end of file to ffmpeg: compare
    # with what the segment (or the media, when shorter) should hold.
    media = result.get("media_duration")
    expected = duration if not media else max(0.0, min(seg.end_s, float(media)) - seg.start_s)
    got = samples.size / audio.SAMPLE_RATE
    if got < expected - INCOMPLETE_TOLERANCE_S:
        result["incomplete"] = f"incomplete download: {got:.2f} s of {expected:.2f} s"
        return None
    if keep_audio:
        flac = dest / f"{name}.flac"
        audio.encode_flac(samples, flac)
        return manifest.clip(
            clip_id,
            "ok",
            attempts=attempts,
            note="; ".join(filter(None, [note, extra])),
            audio=str(flac),
            audio_offset_s=0.0,
            audio_duration_s=None,
            **base,
        )
    ext = Path(result["path"]).suffix or ".media"
    media_path = dest / f"{name}{ext}"
    with atomic.atomic_path(media_path) as tmp:
        shutil.move(result["path"], tmp)
    atomic.write_json(
        dest / f"{name}.json", {"file": media_path.name, "offset_s": offset, "duration_s": duration}
    )
    return manifest.clip(
        clip_id,
        "ok",
        attempts=attempts,
        note=note,
        audio=str(media_path),
        audio_offset_s=offset,
        audio_duration_s=duration,
        **base,
    )


# --------------------------------------------------------------------------- jobs


def run_index(list_path: str, params: dict, out: str) -> None:
    src = params["source_cfg"]
    index = lists.build_index(
        list_path, src["format"], int(src["chunk_size"]), float(src["segment_s"])
    )
    expected = params.get("expected_chunks")
    if expected is not None and len(index["offsets"]) != expected and index["rows"]:
        raise SystemExit(
            f"{list_path}: the list has {index['rows']} rows = {len(index['offsets'])} chunks "
            f"but the DAG was built for {expected}; it changed meanwhile: run snakemake again"
        )
    index["list"] = list_path
    index["provenance"] = provenance.stamp(params, params.get("seed"))
    atomic.write_json(out, index, indent=None)
    log.info(
        f"{list_path}: {index['rows']} rows, {len(index['offsets'])} chunks, "
        f"{len(index['duplicates'])} duplicate rows"
    )


def run_chunk(
    list_path: str, index_path: str, chunk: str, params: dict, out: str, audio_dir: str
) -> None:
    src = params["source_cfg"]
    opts = FetchOptions.from_config(src)
    rules = audio.ClipRules.from_config(params["audio"])
    keep_audio = bool(params["audio"]["keep_audio"])
    with open(index_path) as fh:
        index = json.load(fh)
    segments = lists.read_chunk(
        list_path, src["format"], index, int(chunk), float(src["segment_s"])
    )
    dest = Path(audio_dir)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(dest)
    for leftover in dest.glob(f".*{atomic.TEMP_MARK}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    from tqdm import tqdm

    def fetch(seg: lists.Segment) -> dict:
        row = fetch_clip(seg, dest, opts, keep_audio, rules)
        if opts.sleep_between_s and row.get("attempts"):
            time.sleep(opts.sleep_between_s)
        return row

    # Downloads wait on the network: several run at once; rows keep the list's order.
    with concurrent.futures.ThreadPoolExecutor(max_workers=int(src["download_threads"])) as pool:
        clips = list(
            tqdm(
                pool.map(fetch, segments),
                total=len(segments),
                unit="clip",
                file=sys.stdout,
                desc=f"{params['source']} chunk {chunk}",
                mininterval=5,
            )
        )
    manifest.write_fetch(out, params, chunk, clips, audio.versions())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.youtube", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="scan a segment list once: chunk offsets and duplicates")
    idx.add_argument("--list", required=True)
    idx.add_argument(
        "--params", required=True, help="JSON: source, source_cfg, seed, expected_chunks"
    )
    idx.add_argument("--out", required=True)
    chk = sub.add_parser("chunk", help="download one chunk of a segment list")
    chk.add_argument("--list", required=True)
    chk.add_argument("--index", required=True)
    chk.add_argument("--chunk", required=True)
    chk.add_argument("--params", required=True, help="JSON: source, source_cfg, audio, seed")
    chk.add_argument("--out", required=True, help="chunk manifest (JSON)")
    chk.add_argument("--audio-dir", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    if args.command == "index":
        run_index(args.list, params, args.out)
    else:
        run_chunk(args.list, args.index, args.chunk, params, args.out, args.audio_dir)


if __name__ == "__main__":
    main()
