"""HTTP server for the synthetic source: renders images on request, plus the broken responses.

Run as its own process (`python -m data_prep.sources.server ...`) so rendering never competes
with the downloader for the GIL; it prints `PORT <n>` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import struct
import sys
import time
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ldm.synthetic import render_index

ROUTE = re.compile(r"^/(img|slow|truncated|noai|missing|html|empty|bomb)/(\d+)\.(jpg|png|html)$")


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG declaring an enormous size (a decompression bomb's header) over a few KB of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 16, 9)  # only the first rows: enough to look real
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncate_jpeg(data: bytes) -> bytes:
    """Cut a JPEG just after its start-of-scan header: the headers parse, the pixels never come."""
    sos = data.find(b"\xff\xda")
    return data[: sos + 12] if sos > 0 else data[: len(data) // 4]


class SourceServer(ThreadingHTTPServer):
    """Threaded server holding the source's parameters."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default 5 drops SYNs when many download threads connect at once

    def __init__(self, addr, seed: int, short_side: int, count: int, slow_s: float, delay_ms: int):
        super().__init__(addr, Handler)
        self.seed, self.short_side, self.count = seed, short_side, count
        self.slow_s, self.delay_s = slow_s, delay_ms / 1000

        @lru_cache(maxsize=4096)
        def image(i: int) -> bytes:
            return render_index(self.seed, i, self.short_side)

        self.image = image


class Handler(BaseHTTPRequestHandler):
    """One GET per sample URL; the route says which response (good or broken) to give."""

    server: SourceServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep stderr quiet; img2dataset logs outcomes
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            return self._send(200, b"ok", "text/plain")
        m = ROUTE.match(self.path)
        if not m or m.group(1) == "missing":
            return self._send(404, b"not found", "text/plain")
        kind, i = m.group(1), int(m.group(2))
        if kind in ("img", "slow", "truncated", "noai") and not 0 <= i < self.server.count:
            return self._send(404, b"not found", "text/plain")
        if kind == "html":
            return self._send(200, b"<!doctype html><html><body>Not an image</body></html>", "text/html")
        if kind == "empty":
            return self._send(200, b"", "image/jpeg")
        if kind == "bomb":
            return self._send(200, bomb_png(), "image/png")
        if kind == "slow":
            time.sleep(self.server.slow_s)
        elif self.server.delay_s:
            time.sleep(self.server.delay_s)
        body = self.server.image(i)
        if kind == "truncated":
            body = truncate_jpeg(body)
        # A site that opts its images out of AI training: a good image, refused by the header alone.
        extra = {"X-Robots-Tag": "noai"} if kind == "noai" else None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (slow route)
            self._send(200, body, "image/jpeg", extra)


def main(argv: list[str] | None = None) -> None:
    """Serve until killed; print the bound port on stdout."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--short-side", type=int, required=True)
    p.add_argument("--count", type=int, required=True, help="number of renderable image indices")
    p.add_argument("--slow-s", type=float, default=5.0)
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    server = SourceServer(("127.0.0.1", a.port), a.seed, a.short_side, a.count, a.slow_s, a.delay_ms)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
