"""A recording proxy in front of an HTTP server (the SeaweedFS S3 gateway): which requests, which
byte ranges, how many bytes, and, on demand, injected failures.

SeaweedFS gives no cheap per-request log with the Range: its audit log goes to a fluentd server,
and `weed -v=4` logs the range on one line and the key on another, ~30 lines per request,
interleaved between concurrent requests. So tests that must assert "the driver fetched only
headers" point the clients (AWS_ENDPOINT_URL) at this proxy instead; one proxy per Ray node gives
per-node logs. It forwards each request as received, Host header included, so SigV4 signatures
made for the proxy's address verify upstream. Python forwards at a few hundred MB/s: fine for
tests, not for benchmarks (use the server's own endpoint there). Request bodies must carry a
Content-Length (upload with the server's endpoint, not through the proxy, if a client streams
chunked bodies).
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade",
              "te", "trailer"}
CHUNK = 1 << 20


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query: "/bucket/key"
    query: str
    range: str | None
    status: int
    bytes_sent: int  # the response body's length (less reached a client that hung up early)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: RecordingProxy

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet; see proxy.requests
        pass

    def do_GET(self) -> None:
        self.forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def forward(self) -> None:
        failure = self.proxy.take_failure()
        if failure is not None:
            return self.fail(failure)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.fail(501)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port,
                                              timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            self.relay(response)
        finally:
            upstream.close()

    def relay(self, response: http.client.HTTPResponse) -> None:
        data = None if response.getheader("Content-Length") else response.read()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and not (data is not None and
                                                        name.lower() == "content-length"):
                self.send_header(name, value)
        if data is not None:
            self.send_header("Content-Length", str(len(data)))
        length = len(data) if data is not None else int(response.getheader("Content-Length"))
        # Logged before the body goes out: once a client has its last byte, the test that
        # reads the log must find the request there.
        self.record(response.status, 0 if self.command == "HEAD" else length)
        self.end_headers()
        if data is not None:
            self.wfile.write(data)
        elif self.command != "HEAD":
            while chunk := response.read(CHUNK):
                self.wfile.write(chunk)

    def fail(self, status: int) -> None:
        code = {503: "SlowDown", 500: "InternalError", 501: "NotImplemented"}.get(status, "Error")
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>").encode()
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.record(status, 0)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def record(self, status: int, bytes_sent: int) -> None:
        url = urlsplit(self.path)
        with self.proxy.lock:
            self.proxy.log.append(Request(self.command, unquote(url.path), url.query,
                                          self.headers.get("Range"), status, bytes_sent))


class RecordingProxy:
    """Forwards 127.0.0.1:<free port> to `upstream_url` (http://host:port), recording."""

    def __init__(self, upstream_url: str) -> None:
        upstream = urlsplit(upstream_url)
        self.upstream_host, self.upstream_port = upstream.hostname, upstream.port
        self.lock = threading.Lock()
        self.log: list[Request] = []
        self.failures: list[int] = []
        handler = type("Handler", (ProxyHandler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> list[Request]:
        with self.lock:
            return list(self.log)

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (503 SlowDown: a transient error)
        without forwarding them."""
        with self.lock:
            self.failures.extend([status] * count)

    def take_failure(self) -> int | None:
        with self.lock:
            return self.failures.pop(0) if self.failures else None

    def ranges(self, key: str) -> list[str | None]:
        """The Range headers of the GETs of "/bucket/key", in order."""
        key = "/" + key.lstrip("/")
        return [request.range for request in self.requests
                if request.method == "GET" and request.path == key]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
