"""A loopback HTTP server for download tests: real sockets on 127.0.0.1, no internet.

Each video ID maps to a behaviour (``Server.routes[id] = ...``):

* ``File(path, content_type)``      the file, with Range support (as real media servers have)
* ``Status(code, headers)``         an HTTP error, e.g. 404, or 429 with Retry-After
* ``Stall(seconds)``                headers sent, then nothing (a stalled transfer)
* ``Reset(after_bytes, path)``      the connection is closed mid-body
* ``Trickle(path, bytes_per_s)``    a slow transfer
* ``Flaky(failures, then, code)``   ``failures`` errors, then the behaviour ``then``

URLs are ``http://127.0.0.1:PORT/v/<id>``; ``Server.hits[id]`` counts requests per ID.
"""

from __future__ import annotations

import collections
import http.server
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


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


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):  # noqa: C901 (to split: issue 24)
        parts = self.path.split("?")[0].strip("/").split("/")
        key = parts[1] if len(parts) == 2 and parts[0] == "v" else None
        with self.server.lock:
            self.server.hits[key] += 1
            count = self.server.hits[key]
        route = self.server.routes.get(key)
        if isinstance(route, Flaky):
            route = Status(route.code, route.headers) if count <= route.failures else route.then
        if route is None:
            return self._status(404, {})
        if isinstance(route, Status):
            return self._status(route.code, route.headers)
        if isinstance(route, Stall):
            self.send_response(200)
            self.send_header("Content-Type", "audio/x-wav")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(route.seconds)
            self.close_connection = True
            return
        path = route.path
        data = Path(path).read_bytes()
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].split(",")[0].partition("-")
            if a:
                start = int(a)
                end = int(b) if b else end
            else:
                start = max(0, len(data) - int(b))
            end = min(end, len(data) - 1)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Type", route.content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
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


class Server:
    def __init__(self):
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}
        self.httpd.hits = collections.Counter()
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def routes(self) -> dict:
        return self.httpd.routes

    @property
    def hits(self) -> collections.Counter:
        return self.httpd.hits

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v/{{id}}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
