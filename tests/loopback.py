"""A loopback HTTP server for download tests: real sockets on 127.0.0.1, no internet.

Each video ID maps to a behaviour (``Server.routes[id] = ...``):

* ``File(path, content_type)``      the file, with Range support (as real media servers have)
* ``Status(code, headers)``         an HTTP error, e.g. 404, or 429 with Retry-After
* ``Stall(seconds)``                headers sent, then nothing (a stalled transfer)
* ``Reset(after_bytes, path)``      the connection is closed mid-body
* ``Trickle(path, bytes_per_s)``    a slow transfer
* ``Flaky(failures, then, code)``   ``failures`` errors, then the behaviour ``then``
* ``Sequence(routes)``              request i gets ``routes[i]`` (the last one repeats)

URLs are ``http://127.0.0.1:PORT/v/<id>``; ``Server.hits[id]`` counts requests per ID.

``Server.block(after=N, code=403, seconds=None)`` stands in for YouTube refusing a session: once
N IDs were served, every request gets ``code`` (for ``seconds``, or until ``unblock()``).

:class:`Hub` stands in for the Hugging Face hub (model and dataset repos, revisions, listings,
files with Range). Archives to download are ``File`` routes too (``/v/<file name>``).
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self


@dataclass
class File:
    path: Path
    content_type: str = "audio/x-wav"


@dataclass
class Status:
    code: int
    headers: dict = field(default_factory=dict)


@dataclass
class Stall:
    seconds: float


@dataclass
class Reset:
    after_bytes: int
    path: Path
    content_type: str = "audio/x-wav"


@dataclass
class Trickle:
    path: Path
    bytes_per_s: int
    content_type: str = "audio/x-wav"


@dataclass
class Flaky:
    failures: int
    then: object
    code: int = 503
    headers: dict = field(default_factory=dict)


@dataclass
class Block:
    after: int
    code: int = 403
    seconds: float | None = None
    started: float | None = None

    def active(self, served: set, key: str) -> bool:
        if self.started is None and key not in served and len(served) >= self.after:
            self.started = time.monotonic()
        if self.started is None:
            return False
        return self.seconds is None or time.monotonic() - self.started < self.seconds


@dataclass
class Sequence:
    routes: list


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        parts = self.path.split("?")[0].strip("/").split("/")
        key = parts[1] if len(parts) == 2 and parts[0] == "v" else None
        route = self._route(key)
        if isinstance(route, Status):
            return self._status(route.code, route.headers)
        if isinstance(route, Stall):
            return self._stall(route.seconds)
        data = Path(route.path).read_bytes()
        span = self._respond_range(len(data))
        if span is None:
            return
        body = data[span[0] : span[1] + 1]
        with self.server.lock:
            self.server.served.add(key)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self._send_body(route, body)

    def _route(self, key: str | None):
        """This request's behaviour (counted): a ``Status`` for a blocked session or an unknown
        ID, a ``Sequence`` or ``Flaky`` resolved to the step this request is at."""
        with self.server.lock:
            self.server.hits[key] += 1
            count = self.server.hits[key]
            blocked = self.server.block is not None and self.server.block.active(
                self.server.served, key
            )
        if blocked:
            self.server.blocked_hits += 1
            return Status(self.server.block.code, {})
        route = self.server.routes.get(key)
        if isinstance(route, Sequence):
            route = route.routes[min(count, len(route.routes)) - 1]
        if isinstance(route, Flaky):
            route = Status(route.code, route.headers) if count <= route.failures else route.then
        return Status(404, {}) if route is None else route

    def _stall(self, seconds: float):
        """Headers of a large body, then nothing."""
        self.send_response(200)
        self.send_header("Content-Type", "audio/x-wav")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.flush()
        time.sleep(seconds)
        self.close_connection = True

    def _respond_range(self, size: int) -> tuple[int, int] | None:
        """Start the answer for the request's Range (200, 206, or a whole 416 answer, then
        None); the byte span to send, both ends included."""
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if not (rng and rng.startswith("bytes=")):
            self.send_response(200)
            return start, end
        a, _, b = rng[6:].split(",")[0].partition("-")
        if a:
            start = int(a)
            end = int(b) if b else end
        else:
            start = max(0, size - int(b))
        end = min(end, size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        return start, end

    def _send_body(self, route, body: bytes):
        """The body as the route sends it: cut off (Reset), slowly (Trickle) or whole."""
        try:
            if isinstance(route, Reset):
                self.wfile.write(body[: route.after_bytes])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif isinstance(route, Trickle):
                step = max(1, route.bytes_per_s // 10)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _status(self, code: int, headers: dict):
        body = f"status {code}".encode()
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # Clients that give up (timeouts, killed downloads) are part of the tests.
        pass


class _Loopback:
    """A server on 127.0.0.1 (a free port), serving from a daemon thread inside ``with``;
    ``hits`` counts its requests."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self.httpd.hits = collections.Counter()
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def hits(self) -> collections.Counter:
        return self.httpd.hits

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Server(_Loopback):
    def __init__(self):
        super().__init__(_Handler)
        self.httpd.routes = {}
        self.httpd.block = None
        self.httpd.served = set()
        self.httpd.blocked_hits = 0

    def block(self, after: int, code: int = 403, seconds: float | None = None) -> None:
        """Refuse every request with ``code`` once ``after`` IDs were served (a session block)."""
        with self.httpd.lock:
            self.httpd.block = Block(after, code, seconds)
            self.httpd.served = set()
            self.httpd.blocked_hits = 0

    def unblock(self) -> None:
        with self.httpd.lock:
            self.httpd.block = None

    @property
    def blocked_hits(self) -> int:
        return self.httpd.blocked_hits

    @property
    def routes(self) -> dict:
        return self.httpd.routes

    @property
    def url_template(self) -> str:
        return f"{self.endpoint}/v/{{id}}"


# ----------------------------------------------------------------------------- Hugging Face hub


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The calls huggingface_hub makes: repo info, the file tree (listing), each file (HEAD + GET,
    with Range). Unknown repos, revisions and files answer 404 with the hub's X-Error-Code."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    def _route(self, head: bool):
        path = urllib.parse.unquote(self.path.split("?")[0]).strip("/")
        with self.server.lock:
            self.server.hits[path] += 1
        parts = path.split("/")
        if parts[0] == "api" and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            kind, repo, rev = parts[1], "/".join(parts[2:4]), parts[5]
            return self._api(kind, repo, rev, parts[4], head)
        kind = "datasets" if parts[0] == "datasets" else "models"
        parts = parts[1:] if parts[0] == "datasets" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files = self._files(kind, repo, rev)
            if files is None:
                return
            if name not in files:
                return self._error(404, "EntryNotFound")
            return self._file(files[name], rev, kind, repo, head)
        self._error(404, "RepoNotFound")

    def _files(self, kind: str, repo: str, rev: str) -> dict | None:
        revisions = self.server.repos.get((kind, repo))
        if revisions is None:
            self._error(404, "RepoNotFound")
            return None
        if rev not in revisions:
            self._error(404, "RevisionNotFound")
            return None
        return revisions[rev]

    def _api(self, kind: str, repo: str, rev: str, what: str, head: bool):
        files = self._files(kind, repo, rev)
        if files is None:
            return
        if what == "revision":
            body = {
                "id": repo,
                "sha": self.server.sha,
                "siblings": [{"rfilename": f} for f in files],
            }
        else:
            body = [
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in sorted(files.items())
            ]
        self._send(200, json.dumps(body).encode(), "application/json", head)

    def _file(self, data: bytes, rev: str, kind: str, repo: str, head: bool):
        start, end, code = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end, code = int(a or 0), int(b) if b else end, 206
        extra = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if code == 206:
            extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(code, data[start : end + 1], "application/octet-stream", head, extra)

    def _send(self, code: int, body: bytes, ctype: str, head: bool, extra: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", self.server.sha)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str):
        body = f"{error_code}".encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class Hub(_Loopback):
    """A loopback stand-in for the Hugging Face hub (``HF_ENDPOINT=hub.endpoint``): model and
    dataset repos built by a test, at named revisions.

    ``hub.add("datasets", "owner/name", {"data/x.parquet": b"..."}, revisions=("main", SHA))``;
    ``hub.hits[path]`` counts requests per URL path."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        super().__init__(_HubHandler)
        self.httpd.repos = {}
        self.httpd.sha = self.SHA

    def add(self, kind: str, repo: str, files: dict[str, bytes], revisions=("main", SHA)) -> None:
        self.httpd.repos[(kind, repo)] = {rev: dict(files) for rev in revisions}

    def clear(self) -> None:
        self.httpd.repos.clear()

    def env(self, home: Path) -> dict:
        """Environment variables pointing huggingface_hub at this stand-in (no token, no cache
        outside ``home``)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
        }
