"""Remote files of the mirror sources: HTTP(S) downloads that resume and check a sha256, files of
Hugging Face dataset repos (through huggingface_hub), and the expansion of shard names (brace
patterns, globs, ``hf://`` URLs) when Snakemake builds its DAG.

Every failure is a :class:`FetchError` whose message is one line naming the URL (or the repo,
revision and file) and what to do; ``permanent`` says whether retrying can help.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dasheng_pipeline.common import atomic

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"  # a download in progress (kept: a rerun resumes it)
USER_AGENT = "dasheng-pipeline (+https://github.com/; research data fetcher)"
_GLOB_CHARS = re.compile(r"[*?\[]")


class FetchError(RuntimeError):
    """A remote file could not be obtained (``permanent``: retrying will not help)."""

    def __init__(self, message: str, permanent: bool = False, reason_class: str = "network"):
        super().__init__(message)
        self.permanent = permanent
        self.reason_class = reason_class


@dataclass(frozen=True)
class HttpOptions:
    """Network settings of a source's downloads (its config keys of the same names)."""

    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0

    @classmethod
    def from_config(cls, src: dict) -> HttpOptions:
        return cls(
            timeout_s=float(src.get("socket_timeout_s", 60.0)),
            retries=int(src.get("retries", 3)),
            backoff_s=float(src.get("backoff_s", 2.0)),
            max_backoff_s=float(src.get("max_backoff_s", 60.0)),
        )


# --------------------------------------------------------------------------- HTTP(S)


def sha256_of(path: str | os.PathLike) -> str:
    return atomic.sha256_file(path)


def download(
    url: str,
    dest: str | os.PathLike,
    opts: HttpOptions,
    sha256: str | None = None,
    sleep=time.sleep,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial download (HTTP Range) and checking
    ``sha256`` before the file gets its final name. A mismatch is downloaded once more from
    scratch; a second mismatch raises a permanent :class:`FetchError` (class "checksum")."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if sha256 is None or sha256_of(dest) == sha256.lower():
            return dest
        log.warning(f"{dest}: sha256 differs from the expected {sha256}; downloading it again")
        dest.unlink()
    part = dest.with_name(dest.name + PART_SUFFIX)
    got = ""
    for round_no in (1, 2):
        _fetch_resumable(url, part, opts, sleep)
        if sha256 is None:
            break
        got = sha256_of(part)
        if got == sha256.lower():
            break
        log.warning(f"{url}: sha256 {got} is not the expected {sha256} (download {round_no} of 2)")
        part.unlink()
    else:
        raise FetchError(
            f"checksum mismatch: {url} has sha256 {got}, not the listed {sha256}, in two "
            "downloads (the server's file or the checksum list changed: check their versions)",
            permanent=True,
            reason_class="checksum mismatch",
        )
    atomic.commit(part, dest)
    return dest


def _expected_total(resp, have: int) -> int | None:
    """The whole file's size, from Content-Range (a resumed transfer) or Content-Length."""
    rng = resp.headers.get("Content-Range", "")
    if "/" in rng and rng.rsplit("/", 1)[1].isdigit():
        return int(rng.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return int(length) + (have if resp.status == 206 else 0) if length else None


def _one_transfer(url: str, part: Path, opts: HttpOptions) -> bool:
    """One request, appending to ``part`` from its current size. Returns True when the file is
    complete; raises urllib/http errors for the caller to classify."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=opts.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: complete, or longer than the file
            total = exc.headers.get("Content-Range", "").rsplit("/", 1)[-1]
            if total.isdigit() and int(total) == have:
                return True
            part.unlink()
            return False
        raise
    with resp:
        resumed = have and resp.status == 206
        total = _expected_total(resp, have if resumed else 0)
        with open(part, "ab" if resumed else "wb") as fh:
            shutil.copyfileobj(resp, fh, 1 << 20)
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    return True


def _fetch_resumable(url: str, part: Path, opts: HttpOptions, sleep) -> None:
    attempt = 0
    while True:
        try:
            if _one_transfer(url, part, opts):
                return
            continue  # the partial file was longer than the server's: start over
        except urllib.error.HTTPError as exc:
            if not (exc.code in (408, 425, 429) or exc.code >= 500):
                raise FetchError(
                    f"not found: {url} answered HTTP {exc.code} {exc.reason}"
                    if exc.code in (404, 410)
                    else f"refused: {url} answered HTTP {exc.code} {exc.reason}",
                    permanent=True,
                    reason_class="not found" if exc.code in (404, 410) else "refused",
                ) from None
            reason = f"HTTP {exc.code} {exc.reason}"
        except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, short bodies
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        attempt += 1
        if attempt > opts.retries:
            kept = part.stat().st_size if part.exists() else 0
            raise FetchError(
                f"network: {url}: {reason} ({attempt} attempts; {kept} bytes kept, a rerun "
                "resumes the download)"
            )
        sleep(min(opts.max_backoff_s, opts.backoff_s * 2 ** (attempt - 1)))


# --------------------------------------------------------------------------- Hugging Face


@dataclass(frozen=True)
class HubFile:
    repo: str
    revision: str
    path: str

    @property
    def name(self) -> str:
        return f"hf://datasets/{self.repo}@{self.revision}/{self.path}"


def parse_hf_url(url: str) -> HubFile:
    """``hf://datasets/owner/name[@revision]/path/in/repo`` (the huggingface_hub file-system
    form; a revision holding '/' is written with %2F)."""
    if not url.startswith("hf://"):
        raise ValueError(f"{url!r} is not an hf:// URL")
    rest = url[len("hf://") :]
    rest = rest.removeprefix("datasets/")
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise ValueError(
            f"{url!r}: expected hf://datasets/<owner>/<name>[@<revision>]/<path in the repo>"
        )
    owner, name, path = parts
    name, _, revision = name.partition("@")
    return HubFile(f"{owner}/{name}", urllib.parse.unquote(revision) or "main", path)


def _hub_errors():
    from huggingface_hub import errors

    return errors


def hub_message(exc: BaseException, repo: str, revision: str, filename: str | None = None) -> str:
    """One line for a huggingface_hub error, naming the repo, the revision (and the file)."""
    errors = _hub_errors()
    where = f"Hugging Face dataset {repo!r} at revision {revision!r}"
    if isinstance(exc, errors.GatedRepoError):
        return f"refused: {where} is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"not found: {where}: no such revision (check the revision key)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"not found: {where}: no such repo (check the repo key; a private repo needs HF_TOKEN)"
        )
    if isinstance(exc, errors.EntryNotFoundError | errors.RemoteEntryNotFoundError):
        return f"not found: {where} has no file {filename!r}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    what = f" (file {filename!r})" if filename else ""
    return f"network: {where}{what}: {first}"


def _permanent(exc: BaseException) -> bool:
    errors = _hub_errors()
    return isinstance(
        exc,
        errors.RepositoryNotFoundError
        | errors.RevisionNotFoundError
        | errors.EntryNotFoundError
        | errors.RemoteEntryNotFoundError,
    )


def _endpoint() -> str | None:
    """$HF_ENDPOINT as it is now (huggingface_hub reads it once, when first imported)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_download(hub: HubFile, local_dir: str | os.PathLike) -> Path:
    """Fetch one file of a dataset repo into ``local_dir`` (huggingface_hub resumes and checks it)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            hub.repo,
            hub.path,
            repo_type="dataset",
            revision=hub.revision,
            local_dir=str(local_dir),
            endpoint=_endpoint(),
        )
    except Exception as exc:  # huggingface_hub raises its own errors and httpx's
        message = hub_message(exc, hub.repo, hub.revision, hub.path)
        permanent = _permanent(exc)
        raise FetchError(
            message,
            permanent=permanent,
            reason_class=message.split(":", 1)[0],
        ) from None
    return Path(path)


def hub_list(repo: str, revision: str, patterns: list[str]) -> list[str]:
    """Files of a dataset repo matching any of ``patterns`` (fnmatch), sorted. Raises a one-line
    ValueError naming the repo and revision when the hub cannot list them."""
    from huggingface_hub import HfApi

    try:
        files = HfApi(endpoint=_endpoint()).list_repo_files(
            repo, repo_type="dataset", revision=revision
        )
    except Exception as exc:  # see hub_download
        raise ValueError(hub_message(exc, repo, revision)) from None
    return sorted(f for f in files if any(fnmatch.fnmatchcase(f, p) for p in patterns))


def listing_cache() -> Path:
    """Where hub listings are remembered: ``dasheng-listings/`` in huggingface_hub's cache folder
    ($HF_HUB_CACHE, by default ~/.cache/huggingface/hub)."""
    base = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    return Path(base) / "dasheng-listings"


def hub_list_cached(cache_dir: str | os.PathLike, repo: str, revision: str, patterns: list[str]):
    """:func:`hub_list`, remembered in a JSON file of ``cache_dir`` for the same repo, revision
    and patterns: the DAG is built again in every cluster job, and the hub must not be asked each
    time. Delete the file to list again (a branch such as ``main`` may have changed)."""
    key = {"repo": repo, "revision": revision, "patterns": list(patterns)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{digest}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(cache.read_text())
        if doc["key"] == key:
            return doc["files"]
    files = hub_list(repo, revision, patterns)
    atomic.write_json(cache, {"key": key, "files": files})
    return files


# --------------------------------------------------------------------------- shard names


def expand(patterns: list[str], hub_cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Expand shard names as Snakemake builds the DAG: brace patterns
    (``shard-{000000..000099}.tar``, webdataset's own expansion), globs of local paths and of
    ``hf://`` paths (listed on the hub), URLs as they are. Order: as given, each glob sorted;
    a name given twice is kept once."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for pattern in patterns:
        for name in expand_urls(pattern):
            if name.startswith("hf://") and _GLOB_CHARS.search(name):
                out += _hub_glob(name, hub_cache_dir)
            elif "://" not in name and _GLOB_CHARS.search(name):
                out += sorted(glob.glob(name, recursive=True))
            else:
                out.append(name)
    return list(dict.fromkeys(out))


def _hub_glob(name: str, cache_dir) -> list[str]:
    hub = parse_hf_url(name)
    if cache_dir is None:
        files = hub_list(hub.repo, hub.revision, [hub.path])
    else:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        files = hub_list_cached(
            Path(cache_dir) / f"{digest}.json", hub.repo, hub.revision, [hub.path]
        )
    return [HubFile(hub.repo, hub.revision, f).name for f in files]


def local_name(name: str) -> str:
    """A file name for a remote shard in the download folder: a hash of the whole URL (two
    shards of the same name in different folders do not meet) and its last path element."""
    base = name.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "download"
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', base)}"
