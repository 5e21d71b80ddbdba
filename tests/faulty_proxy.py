"""A small HTTP proxy on 127.0.0.1 that fails a bounded number of requests before passing everything through.

Put in front of the moto S3 server (``AWS_ENDPOINT_URL`` pointed at :attr:`FaultyProxy.url`), it plays the
flaky object store: each request that ``match(method, path)`` selects takes the next fault from ``faults``
until they are used up, then requests pass unchanged. Faults:

- ``"503"``: answer ``503 Service Unavailable`` with S3's XML error body;
- ``"drop"``: close the connection without answering;
- ``"cut"``: forward the request, send the response headers and half of the body, then close.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Callable

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
S3_503 = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
          b"<Message>injected by the test proxy</Message></Error>")


class FaultyProxy:
    def __init__(self, upstream: str, faults: list[str], match: Callable[[str, str], bool], timeout_s: float = 10.0):
        assert all(f in ("503", "drop", "cut") for f in faults), faults
        up = urllib.parse.urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.faults, self.match, self.timeout_s = list(faults), match, timeout_s
        self.served: list[tuple[str, str, str]] = []  # (fault, method, path) in the order they were injected
        self.passed = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=self.timeout_s)

    def _next_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            if self.faults and self.match(method, path):
                fault = self.faults.pop(0)
                self.served.append((fault, method, path))
                return fault
            self.passed += 1
            return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = proxy.timeout_s  # a stuck client cannot hold a thread longer than this

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(S3_503)))
                    self.end_headers()
                    self.wfile.write(S3_503)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout_s)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                # a HEAD answer has no body but announces the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
