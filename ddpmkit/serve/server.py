"""The page over HTTP, with the standard library's ``http.server``: one thread per connection, the work one request
at a time (:class:`~ddpmkit.serve.app.App`'s lock).

- ``GET /``: the page (one HTML file, its script and style inline; it loads nothing else);
- ``GET /api/info``: the run, for the page's form (JSON);
- ``POST /api/sample``, ``/api/inpaint``, ``/api/edit``: a JSON request; the answer is a stream of JSON lines
  (``application/x-ndjson``), one event each, written as the chain runs, so that the page shows every step as it
  comes. A refused request is a 4xx with ``{"error": one line, "field": ...}``; an error after the stream began is
  its last line, ``{"type": "error", ...}``.

Every answer is JSON or the page, never a traceback. Limits: a request body of ``MAX_BODY`` bytes (413 beyond),
JSON only (415), a Host header that names this machine while the server listens on the loopback (403 otherwise:
another site's page cannot reach it through DNS rebinding), ``TIMEOUT`` seconds of silence on a connection.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..errors import DdpmkitError
from .app import MAX_BODY, App, status_of

__all__ = ["Server", "make_server", "is_loopback", "TIMEOUT"]

TIMEOUT = 60  # seconds a connection may stay silent (reading a request, or a client that stopped reading)
ROUTES = {"/api/sample": "sample", "/api/inpaint": "inpaint", "/api/edit": "edit"}
# the page's own rules: its inline script and style, images from data URLs, requests to this server only
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientGone(Exception):
    """The client closed the connection (or stopped reading) while its answer was being written."""


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer for one :class:`App`; its handler threads are daemons, so that Ctrl-C ends it at once
    even while a request is at work."""

    daemon_threads = True

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0, log=None):
        self.app = app
        self.log = log or app.log
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.loopback = is_loopback(host)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def handle_error(self, request, client_address):  # one line, not socketserver's traceback
        import sys

        e = sys.exc_info()[1]
        self.log(f"error: {client_address[0]}: {type(e).__name__}: {e}")


def make_server(app: App, host: str = "127.0.0.1", port: int = 0, log=None) -> Server:
    """A :class:`Server` bound to ``host``:``port`` (0: any free port; its ``url`` says which); OSError when the
    address cannot be bound. Serve with ``serve_forever()``."""
    return Server(app, host, port, log)


class Handler(BaseHTTPRequestHandler):
    """The page's requests: routes, limits, JSON errors and the streamed answer."""

    server: Server
    server_version = "ddpmkit"
    sys_version = ""
    timeout = TIMEOUT
    error_content_type = "application/json"

    # ------------------------------------------------------------------ answers
    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def send_error(self, code, message=None, explain=None):  # http.server's own refusals, as JSON too
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a request line too broken to name its version: answer in HTTP/1.0
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        try:
            self._json(code, {"error": message or phrase})
        except OSError:
            pass

    def handle_one_request(self):  # one line in the log per request, when its answer is complete
        self._t0, self._status = time.perf_counter(), None
        super().handle_one_request()
        if self._status is not None:
            took = time.perf_counter() - self._t0
            self.server.log(f'{self.client_address[0]} "{self.requestline}" {self._status} {took:.2f} s')

    def log_request(self, code="-", size="-"):
        self._status = code.value if isinstance(code, HTTPStatus) else code

    def log_message(self, format, *args):
        self.server.log(f"{self.client_address[0]}: {format % args}")

    # ------------------------------------------------------------------ checks
    def _host_ok(self) -> bool:
        """While the server listens on the loopback, the Host header must name this machine (DNS rebinding)."""
        host = self.headers.get("Host")
        if not self.server.loopback or host is None:
            return True
        name = urlsplit(f"//{host}").hostname or ""
        if is_loopback(name):
            return True
        self._json(403, {"error": f"this server answers to the names of this machine only, not {host!r}"})
        return False

    def _route(self) -> str:
        return urlsplit(self.path).path

    # ------------------------------------------------------------------ methods
    def do_GET(self):
        path = self._route()
        if not self._host_ok():
            return
        if path in ("/", "/index.html"):
            self._send(200, self.server.app.page, "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_POLICY})
        elif path == "/api/info":
            try:
                info = self.server.app.info()
            except Exception as e:  # a fault of the server: one line, and it goes on
                self._json(500, {"error": f"internal error: {self._fault(path, e)}"})
                return
            self._json(200, info)
        elif path in ROUTES:
            self._json(405, {"error": f"{path} takes a POST with a JSON body"}, {"Allow": "POST"})
        else:
            self._json(404, {"error": f"no page {path!r}: the page is /, its requests /api/..."})

    def do_POST(self):
        path = self._route()
        if not self._host_ok():
            return
        kind = ROUTES.get(path)
        if kind is None:
            self._json(404 if path not in ("/", "/api/info") else 405, {"error": f"nothing to POST at {path!r}"})
            return
        body = self._read_json()
        if body is None:
            return
        stream = _Stream(self)
        try:
            self.server.app.handle(kind, body, stream.emit)
        except ClientGone:
            self.server.log(f"{self.client_address[0]}: {path}: the client went away; the work was stopped")
        except DdpmkitError as e:
            status, payload = status_of(e)
            if stream.started:
                stream.last({"type": "error", "status": status, **payload})
            else:
                self._json(status, payload)
        except Exception as e:  # a fault of the server: one line in the log and in the answer; the server goes on
            payload = {"error": f"internal error: {self._fault(path, e)}"}
            if stream.started:
                stream.last({"type": "error", "status": 500, **payload})
            else:
                self._json(500, payload)

    def _fault(self, path: str, e: Exception) -> str:
        """An unexpected exception as one line, logged."""
        line = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        self.server.log(f"error: {path}: {line}")
        return line

    def _read_json(self):
        """The request's JSON body, or None after answering why not (411, 413, 415, 400)."""
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._json(415, {"error": f"send the request as application/json, not {ctype or 'nothing'}"})
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self._json(411, {"error": "the request needs a Content-Length"})
            return None
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            self._json(400, {"error": f"a bad Content-Length: {length!r}"})
            return None
        if n > MAX_BODY:
            self.close_connection = True  # the body is not read
            self._json(413, {"error": f"the request is {n:,} bytes, more than the {MAX_BODY:,} allowed"})
            return None
        raw = self.rfile.read(n)
        if len(raw) < n:
            self._json(400, {"error": f"the request ended after {len(raw):,} of its {n:,} bytes"})
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            self._json(400, {"error": f"the request is not valid JSON: {str(e).splitlines()[0][:200]}"})
            return None

    def _not_allowed(self):
        self._route()
        self._json(405, {"error": f"{self.command} is not answered here: GET the page, POST the requests"},
                   {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed


class _Stream:
    """The answer to a request at work: headers at the first event, then one JSON line per event, sent at once."""

    def __init__(self, handler: Handler):
        self.handler, self.started = handler, False

    def emit(self, event: dict) -> None:
        h = self.handler
        try:
            if not self.started:
                h.send_response(200)
                h.send_header("Content-Type", "application/x-ndjson")
                h.send_header("Cache-Control", "no-store")
                h.send_header("X-Content-Type-Options", "nosniff")
                h.end_headers()
                h.close_connection = True  # the answer ends when the connection closes (HTTP/1.0)
                self.started = True
            h.wfile.write(json.dumps(event).encode() + b"\n")
            h.wfile.flush()
        except OSError as e:  # BrokenPipeError, ConnectionResetError, a timeout: nobody is reading any more
            raise ClientGone(str(e)) from None

    def last(self, event: dict) -> None:
        try:
            self.emit(event)
        except ClientGone:
            pass
