"""A hostile little internet for the SSRF tests, run inside a network namespace (see test_fetch_guard.py).

Run as `python -m tests.data_prep.ssrf_world OUT_DIR` in a namespace whose loopback carries the
addresses below and whose /etc/resolv.conf names 127.0.0.1. It serves:

- a DNS server on 127.0.0.1:53 that changes its answers: `rebind.example` is public on the first
  A query and private after; `pinned.example` is public on the first two (the driver's check, then
  the worker's pinned check) and private after, so only a third lookup (a downloader resolving the
  name again after the check) reaches the private address;
- a "public" web server on PUBLIC (a global unicast address, so the public policy admits it) with
  an image and redirects to forbidden places;
- "forbidden" web servers on the metadata address and a private address that record every request.

Then it runs the ingest stage with the public policy through the CLI and writes OUT_DIR/result.json.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PUBLIC = "93.184.216.34"  # global unicast (is_global): the public policy admits it
PRIVATE = "10.1.2.3"
METADATA = "169.254.169.254"
ADDRESSES = (PUBLIC, PRIVATE, METADATA)

REDIRECTS = {
    "/to-metadata": f"http://{METADATA}/latest/meta-data/iam/security-credentials/",
    "/to-private": f"http://{PRIVATE}/secret.jpg",
    "/to-private-name": "http://internal.example/secret.jpg",  # a name that resolves to PRIVATE
    "/to-file": "file:///etc/passwd",
    "/to-public": f"http://{PUBLIC}/img.jpg",  # an allowed hop: still followed
}
# URL -> outcome the ingest manifest must count once the guard covers every hop and pins addresses.
REDIRECT_URLS = {
    f"http://{PUBLIC}/img.jpg": "success",
    f"http://{PUBLIC}/to-public": "success",
    f"http://{PUBLIC}/to-metadata": "blocked_redirect",
    f"http://{PUBLIC}/to-private": "blocked_redirect",
    f"http://{PUBLIC}/to-private-name": "blocked_redirect",
    f"http://{PUBLIC}/to-file": "blocked_redirect",
}
REBIND_URLS = {
    "http://rebind.example/img.jpg": "blocked_rebind",
    "http://pinned.example/img.jpg": "success",
}
# name -> how many A queries get the public answer before it turns private (None: always private)
PUBLIC_ANSWERS = {"rebind.example": 1, "pinned.example": 2, "internal.example": 0}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def dns_reply(query: bytes, queries: Counter) -> bytes:
    """Answer one DNS query: A records per PUBLIC_ANSWERS, empty AAAA, NXDOMAIN for other names."""
    i, labels = 12, []
    while query[i]:
        labels.append(query[i + 1 : i + 1 + query[i]].decode().lower())
        i += 1 + query[i]
    qtype = struct.unpack(">H", query[i + 1 : i + 3])[0]
    question = query[12 : i + 5]
    name = ".".join(labels)
    known = name in PUBLIC_ANSWERS
    answers = b""
    if known and qtype == 1:
        queries[name] += 1
        ip = PUBLIC if queries[name] <= PUBLIC_ANSWERS[name] else PRIVATE
        answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + socket.inet_aton(ip)
    flags = 0x8180 | (query[2] & 1) << 8 | (0 if known else 3)  # response, RD copied, RA, rcode
    header = query[:2] + struct.pack(">HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    return header + question + answers


def serve_dns(queries: Counter) -> None:
    """A UDP DNS server on 127.0.0.1:53 (daemon thread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))

    def loop() -> None:
        while True:
            data, peer = sock.recvfrom(512)
            sock.sendto(dns_reply(data, queries), peer)

    threading.Thread(target=loop, daemon=True).start()


def serve_http(address: str, hits: list) -> None:
    """A web server on address:80: redirects per REDIRECTS, else a JPEG; every request is recorded."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append({"server": address, "path": self.path, "host": self.headers.get("Host"),
                         "agent": self.headers.get("User-Agent", "")})  # fmt: skip
            target = REDIRECTS.get(self.path) if address == PUBLIC else None
            if target:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((address, 80), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(out_dir: str) -> None:
    """Serve the world, run ingest with the public policy against it, write result.json."""
    queries: Counter = Counter()
    hits: list = []
    serve_dns(queries)
    for address in ADDRESSES:
        serve_http(address, hits)
    urls = {**REDIRECT_URLS, **REBIND_URLS}
    src = os.path.join(out_dir, "urls.parquet")
    pq.write_table(pa.table({"URL": list(urls), "TEXT": [f"row {i}" for i in range(len(urls))]}), src)
    cli = [sys.executable, "-m", "flows.cli", "stage", "ingest", "--profile", "test"]
    cli += ["--workdir", os.path.join(out_dir, "w"), "--set", "source.kind=parquet"]
    cli += ["--set", f"source.paths=[{src}]", "--set", "ingest.url_policy=public"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=240)
    result = {"returncode": done.returncode, "stderr": done.stderr[-3000:], "hits": hits, "queries": dict(queries)}
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
