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
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dasheng_pipeline.common import atomic, audio, logs, manifest, provenance
from dasheng_pipeline.sources import lists

log = logging.getLogger(__name__)

# A download may be this much shorter than its segment (codec frame boundaries).
INCOMPLETE_TOLERANCE_S = 0.5
# YouTube's answers when it refuses a whole session (about 300 videos an hour, then these for
# every video): checked before the permanent markers ("isn't available" is not "not available").
SESSION_MARKERS = (
    "not a bot",
    "try again later",
    "rate-limited",
    "rate limited",
    "unusual traffic",
)
# HTTP statuses that are one clip's trouble when alone and a session-level block in a burst.
SUSPECT_STATUSES = (403, 429)
PERMANENT_MARKERS = (
    "private video",
    "terminated",
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


def _session_level(message: str) -> bool:
    lowered = message.lower().replace("\u2019", "'")
    return any(marker in lowered for marker in SESSION_MARKERS)


def _classify(exc: BaseException) -> dict:
    """Turn a yt-dlp error into {transient, kind, reason, retry_after}. ``kind``: ``permanent``
    (removed, private, copyright, terminated: recorded, never retried), ``transient`` (this clip's
    trouble: retried), ``session`` (YouTube refuses the whole session: rate limit, bot check) or
    ``suspect`` (HTTP 403 / 429: one is this clip's, a burst of them is a session-level block)."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError

    cause = getattr(exc, "exc_info", None)
    cause = cause[1] if cause and len(cause) > 1 else exc
    message = str(exc).removeprefix("ERROR: ").strip()
    if _session_level(message):
        return {"transient": True, "kind": "session", "reason": message[:300], "retry_after": None}
    if isinstance(cause, HTTPError):
        status = cause.status
        retry_after = None
        with contextlib.suppress(Exception):
            value = cause.response.headers.get("Retry-After")
            retry_after = float(value) if value is not None else None
        transient = status in (408, 425, 429) or status >= 500
        kind = (
            "suspect" if status in SUSPECT_STATUSES else "transient" if transient else "permanent"
        )
        return {
            "transient": transient,
            "kind": kind,
            "reason": f"HTTP {status} {cause.reason or ''}".strip(),
            "retry_after": retry_after,
        }
    if isinstance(cause, TransportError):
        return {
            "transient": True,
            "kind": "transient",
            "reason": f"network error: {cause}",
            "retry_after": None,
        }
    lowered = message.lower()
    if any(marker in lowered for marker in PERMANENT_MARKERS):
        return {
            "transient": False,
            "kind": "permanent",
            "reason": message[:300],
            "retry_after": None,
        }
    # ffmpeg range downloads report network trouble only as a non-zero exit.
    return {
        "transient": True,
        "kind": "transient",
        "reason": message[:300] or type(exc).__name__,
        "retry_after": None,
    }


class _Quiet:
    """A logger for yt-dlp that drops everything: the result dict carries what matters."""

    def debug(self, msg):
        pass

    def info(self, msg):
        pass

    def warning(self, msg):
        pass

    def error(self, msg):
        pass


def _ydl_params(workdir: str, opts: FetchOptions, exe: str) -> dict:
    """yt-dlp's options for one download: no retries of its own (ours are bounded and
    classified), a socket timeout, the media into ``workdir``."""
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
    return params


def _download(url: str, start_s: float, end_s: float, workdir: str, opts: FetchOptions) -> dict:
    """Run yt-dlp once (in the child process). Returns the result dict."""
    import yt_dlp
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
    from yt_dlp.utils import download_range_func

    exe = audio.ffmpeg_exe()
    FFmpegPostProcessor._ffmpeg_location.set(exe)  # the API does not set it for range downloads
    params = _ydl_params(workdir, opts, exe)
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
    clip_id: str | None = None,
) -> dict:
    """Obtain one segment; returns its manifest row (``clip_id``: the corpus's ID of the
    segment, when the source is a route of a corpus). A failed row caused by a session-level
    answer carries ``block`` ("session" or "suspect"): :class:`SessionGuard` decides whether it
    is final."""
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
    clip_id = clip_id or seg.clip_id
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
        kind = result.get("kind", "transient" if result["transient"] else "permanent")
        if kind == "session" or not result["transient"] or attempt_no == opts.retries:
            break
        sleep(backoff_delay(opts, attempt_no, result.get("retry_after")))
    return _failed_row(clip_id, result, attempt_no + 1, base)


def _failed_row(clip_id: str, result: dict, attempts: int, base: dict) -> dict:
    kind = result.get("kind", "transient" if result["transient"] else "permanent")
    shown = "permanent" if kind == "permanent" else "transient"
    row = manifest.clip(
        clip_id,
        "failed",
        f"{result['reason']} ({shown}; {attempts} attempt(s))",
        attempts=attempts,
        reason_class=shown,
        **base,
    )
    if kind in ("session", "suspect"):
        row["block"] = kind
    return row


def _shortfall(samples, seg: lists.Segment, media: float | None) -> str | None:
    """Why the decoded ``samples`` are too short, or None. A connection closed mid-transfer can
    look like a clean end of file to ffmpeg: compare with what the segment (or the media, when
    shorter) should hold."""
    duration = seg.end_s - seg.start_s
    expected = duration if not media else max(0.0, min(seg.end_s, float(media)) - seg.start_s)
    got = samples.size / audio.SAMPLE_RATE
    if got < expected - INCOMPLETE_TOLERANCE_S:
        return f"incomplete download: {got:.2f} s of {expected:.2f} s"
    return None


def _keep_media(downloaded: str, stem: Path, offset: float, duration: float) -> Path:
    """The downloaded media as it came (with a sidecar naming the segment in it)."""
    media_path = stem.with_name(stem.name + (Path(downloaded).suffix or ".media"))
    with atomic.atomic_path(media_path) as tmp:
        shutil.move(downloaded, tmp)
    atomic.write_json(
        stem.with_name(stem.name + ".json"),
        {"file": media_path.name, "offset_s": offset, "duration_s": duration},
    )
    return media_path


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
    result["incomplete"] = _shortfall(samples, seg, result.get("media_duration"))
    if result["incomplete"]:
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
    media_path = _keep_media(result["path"], dest / name, offset, duration)
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


EX_TEMPFAIL = 75  # the job stopped on a session-level block: rerun later, it continues


class Blocked(Exception):
    """YouTube kept refusing the session after every pause: the job stops (nothing is lost)."""


def span(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


class SessionGuard:
    """Watches a chunk job's downloads for a session-level block and pauses all of them.

    A ``session`` answer (rate-limit message, bot check) blocks at once; ``suspect`` answers
    (HTTP 403 / 429) block when ``burst`` consecutive clips end with one. A block puts the clips
    it hit back in the queue, and every download thread waits ``pause_s`` (doubling at each
    further block without a success in between). After ``max_pauses`` pauses the next block
    stops the job: the clips not done are left for a rerun, none is marked failed.
    """

    def __init__(
        self, burst: int, pause_s: float, max_pauses: int, sleep=time.sleep, clock=time.monotonic
    ):
        self.burst, self.pause_s, self.max_pauses = max(1, burst), pause_s, max_pauses
        self.sleep, self.clock = sleep, clock
        self.lock = threading.Lock()
        self.held: list[int] = []  # consecutive suspect clips, not final yet
        self.pauses = 0  # pauses since the last success
        self.until = 0.0
        self.epoch = 0  # blocks so far: an attempt from before a pause cannot block again
        self.stopped = False
        self.reason = ""
        self.paused_s = 0.0

    @classmethod
    def from_config(cls, src: dict, sleep=time.sleep, clock=time.monotonic) -> SessionGuard:
        return cls(
            int(src["block_burst"]),
            float(src["block_pause_min"]) * 60,
            int(src["block_pauses"]),
            sleep,
            clock,
        )

    def wait(self) -> int | None:
        """Before a download: wait out a pause. The current epoch, or None once stopped."""
        while True:
            with self.lock:
                if self.stopped:
                    return None
                remaining = self.until - self.clock()
                if remaining <= 0:
                    return self.epoch
            self.sleep(min(remaining, 5.0))

    def outcome(self, index: int, row: dict, epoch: int) -> tuple[list[int], list[int]]:
        """Record clip ``index``'s row: (clips whose rows are now final, clips to retry)."""
        kind = row.get("block")
        with self.lock:
            if kind is None:
                if row["status"] == "ok":
                    self.pauses = 0
                released, self.held = self.held, []
                return [*released, index], []
            if epoch != self.epoch:  # hit by the block already known: try it again after the pause
                return [], [index]
            if kind == "suspect" and len(self.held) + 1 < self.burst:
                self.held.append(index)
                return [], []
            retry, self.held = [*self.held, index], []
            what = row["reason"].rsplit(" (", 1)[0]
            if kind == "suspect":
                what = f"{len(retry)} clips in a row failed with {what}"
            self._block(epoch, what)
            return [], retry

    def release(self) -> list[int]:
        """At the end: held suspect clips are ordinary failures after all."""
        with self.lock:
            released, self.held = self.held, []
            return released

    def _block(self, epoch: int, reason: str) -> None:
        if epoch != self.epoch:
            return  # started before the pause that this block already caused
        self.epoch += 1
        self.reason = reason
        if self.pauses >= self.max_pauses:
            self.stopped = True
            return
        pause = self.pause_s * 2**self.pauses
        self.pauses += 1
        self.paused_s += pause
        self.until = self.clock() + pause
        log.warning(
            f"session-level block ({reason}): every download of this job pauses {span(pause)} "
            f"(pause {self.pauses} of {self.max_pauses})"
        )


class Journal:
    """The rows a chunk job has finished, one JSON line each (``.journal.jsonl`` in its audio
    folder), so that a job stopped by a block or killed continues where it stopped: its ok,
    rejected and permanently failed clips are not asked for again. Removed once the chunk
    manifest is written (a later forced rerun retries failures, as always)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[int, dict] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)  # a line cut by a kill does not parse: skipped
                    self.rows[int(entry["index"])] = entry["row"]
        self.lock = threading.Lock()

    def reusable(self, index: int, clip_id: str) -> dict | None:
        row = self.rows.get(index)
        if row is None or row["clip_id"] != clip_id:
            return None
        if row["status"] == "failed" and row.get("reason_class") != "permanent":
            return None
        return row

    def add(self, index: int, row: dict) -> None:
        line = json.dumps({"index": index, "row": row}, sort_keys=True)
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def download_all(todo: list, fetch, guard: SessionGuard, threads: int, journal: Journal) -> dict:
    """Run ``fetch(item)`` over ``todo`` (pairs of (index, item)) in ``threads`` threads under the
    guard; the final rows by index (clips left when the guard stops are absent)."""
    queue = collections.deque(range(len(todo)))
    final: dict[int, dict] = {}
    held: dict[int, dict] = {}
    busy = 0
    cond = threading.Condition()

    def settle(done: list[int], retry: list[int], pos: int, row: dict) -> None:
        held[pos] = row
        for j in done:
            final[todo[j][0]] = held.pop(j)
            journal.add(todo[j][0], final[todo[j][0]])
        for j in reversed(retry):
            held.pop(j, None)
            queue.appendleft(j)

    def worker() -> None:
        nonlocal busy
        while True:
            epoch = guard.wait()
            with cond:
                if epoch is not None and not queue and busy:
                    cond.wait(1.0)  # a clip in flight may come back to the queue
                    continue
                if epoch is None or not queue:
                    cond.notify_all()
                    return
                pos = queue.popleft()
                busy += 1
            row = fetch(todo[pos][1])
            done, retry = guard.outcome(pos, row, epoch)
            with cond:
                settle(done, retry, pos, row)
                busy -= 1
                cond.notify_all()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if not guard.stopped:
        for j in guard.release():
            final[todo[j][0]] = held.pop(j)
    return final


def _route_ids(segments: list, params: dict) -> tuple[dict[int, str], collections.Counter]:
    """In a corpus: each segment's corpus ID, and the segments an earlier route obtained (left
    out, counted). Outside one: the YouTube source's own clip IDs."""
    route = params.get("route")
    skipped: collections.Counter = collections.Counter()
    if not route:
        return {s.row: s.clip_id for s in segments}, skipped
    from dasheng_pipeline.sources import routes

    earlier = routes.IdSet.from_tables(route.get("earlier", []))
    fmt = params["source_cfg"]["format"]
    ids = {}
    for seg in segments:
        cid = routes.corpus_id(seg, fmt) if not seg.error else seg.clip_id
        if not seg.error and cid in earlier:
            skipped["obtained by an earlier route"] += 1
            continue
        ids[seg.row] = cid
    return ids, skipped


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
    ids, skipped = _route_ids(segments, params)
    segments = [s for s in segments if s.row in ids]
    dest = Path(audio_dir)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(dest)
    for leftover in dest.glob(f".*{atomic.TEMP_MARK}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    journal = Journal(dest / ".journal.jsonl")
    reused = {s.row: journal.reusable(s.row, ids[s.row]) for s in segments}
    todo = [(s.row, s) for s in segments if reused[s.row] is None]

    def fetch(seg: lists.Segment) -> dict:
        row = fetch_clip(seg, dest, opts, keep_audio, rules, clip_id=ids[seg.row])
        if opts.sleep_between_s and row.get("attempts"):
            time.sleep(opts.sleep_between_s)
        return row

    guard = SessionGuard.from_config(src)
    label = f"{params['source']} chunk {chunk}"
    log.info(
        f"{label}: {len(todo)} clips to fetch, {len(segments) - len(todo)} done by an earlier run"
    )
    final = download_all(todo, fetch, guard, int(src["download_threads"]), journal)
    if guard.stopped:
        left = len(todo) - len(final)
        raise Blocked(
            f"{label}: YouTube blocks this session ({guard.reason}) after {guard.pauses} pause(s) "
            f"of {span(guard.paused_s)} in all; {left} clip(s) left for a rerun, none marked "
            f"failed. Rerun later to continue; to avoid blocks: a cookies file (cookies:), a longer "
            f"sleep_between_s, fewer download jobs at once (--resources downloads=1), or a PO-token "
            f"provider plugin for yt-dlp"
        )
    clips = [reused[s.row] or final[s.row] for s in segments]
    extra = {"skipped": dict(skipped)} if params.get("route") else {}
    manifest.write_fetch(out, params, chunk, clips, audio.versions(), **extra)
    journal.remove()


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
        return
    try:
        run_chunk(args.list, args.index, args.chunk, params, args.out, args.audio_dir)
    except Blocked as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_TEMPFAIL) from None


if __name__ == "__main__":
    main()
