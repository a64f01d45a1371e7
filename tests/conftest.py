"""Shared test fixtures: a real HTTP server on loopback and real image files.

`image_server`  a threaded HTTP server on 127.0.0.1 (free port) serving files from a temporary folder,
                plus a few routes for failure cases; it records every request it receives.
`real_images`   real PNG and JPEG files written from the MedMNIST datasets in ../shared/datasets.

See the docstrings of `ImageServer` and `RealImages` for what each offers.
"""
from __future__ import annotations

import functools
import io
import json
import mimetypes
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

# The Redis the tests use: a database of their own (15 by default), never the default 0 a real
# deployment on the same machine would use. PEAL_TEST_REDIS_URL overrides it.
TEST_REDIS_URL = os.environ.get("PEAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# $PEAL_DATASETS, else ../shared/datasets beside the repository (where CI puts it)
DATASETS = Path(os.environ.get("PEAL_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


# --- small helpers shared by test modules --------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def forget_queue(client, name):
    """Delete every key this test's queue left in the shared Redis (RQ keeps dead workers a while)."""
    for key in client.scan_iter("rq:worker:*"):
        if client.type(key) == b"hash" and name.encode() in (client.hget(key, "queues") or b"").split(b","):
            client.srem("rq:workers", key)
            client.delete(key, key + b":executions")
    client.srem("rq:queues", f"rq:queue:{name}")
    keys = list(client.scan_iter(f"peal:{name}:*")) + list(client.scan_iter(f"rq:*{name}*"))
    if keys:
        client.delete(*keys)


# --- image_server --------------------------------------------------------------------------------

@dataclass
class SeenRequest:
    """One request as the server saw it (headers with lower-case names)."""
    method: str
    path: str          # path and query, as sent
    host: str          # the Host header
    headers: dict[str, str]
    body: bytes = b""


class ImageServer:
    """A real HTTP server on 127.0.0.1 for tests.

    - `url(path, host="127.0.0.1")`: absolute URL of `path` ("/a.png", "/redirect?to=..."). Pass
      `host="localhost"` to reach the same server under a second host name (a "different host" for
      host allow-lists and auth-header checks).
    - `dir`: folder whose files are served at `/<relative path>` (GET and HEAD).
    - `add(name, data)`: write bytes (or copy a file) into `dir`; returns the file's URL.
    - `requests`: every request received, in order (`SeenRequest`); `count(path)` counts requests whose
      path (without query) equals `path`; `clear()` forgets them.
    - `routes`: extra handlers, `routes["/x"] = fn(handler, query_dict)`, for tests that need their own.

    Built-in routes (query parameters in brackets):
    - `/redirect?to=URL[&code=302]`            answers `code` with `Location: URL`.
    - `/status/<code>`                         answers that status with a short text body.
    - `/slow/<file>?delay=S`                   waits S seconds before answering with the file.
    - `/trickle?chunks=N&interval=S[&size=B]`  sends N chunks of B bytes, S seconds apart.
    - `/huge?bytes=N[&length=1]`               streams N zero bytes; `length=0` omits Content-Length.
    - `/echo-headers`                          answers the request headers as JSON.
    """

    def __init__(self, root: Path):
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.requests: list[SeenRequest] = []
        self.routes: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"image-server-{self.port}", daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, name: str, data: bytes | Path) -> str:
        target = self.dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(data).read_bytes() if isinstance(data, Path) else data)
        return self.url("/" + name)

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if urlsplit(r.path).path == path)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def sleep(self, seconds: float) -> bool:
        """Sleep in a handler; returns False early when the server is stopping."""
        return not self._stop.wait(seconds)

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ImageServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, req: SeenRequest) -> None:
        with self._lock:
            self.requests.append(req)


def _handler_for(server: ImageServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: simple, and bodies may be close-delimited

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._dispatch(head=True)

        def do_GET(self):
            self._dispatch(head=False)

        def do_POST(self):
            self._dispatch(head=False)

        def _dispatch(self, head: bool):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            server._record(SeenRequest(self.command, self.path, self.headers.get("Host", ""),
                                       {k.lower(): v for k, v in self.headers.items()}, body))
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            self._head_only = head
            try:
                if path in server.routes:
                    server.routes[path](self, query)
                elif path == "/redirect":
                    self.send_response(int(query.get("code", 302)))
                    self.send_header("Location", query["to"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/status/"):
                    self.answer(int(path.rsplit("/", 1)[1]), b"status page\n", "text/plain")
                elif path.startswith("/slow/"):
                    if server.sleep(float(query.get("delay", 5))):
                        self.serve_file(path[len("/slow"):])
                elif path == "/trickle":
                    self._trickle(int(query.get("chunks", 10)), float(query.get("interval", 0.2)),
                                  int(query.get("size", 100)))
                elif path == "/huge":
                    self._huge(int(query["bytes"]), query.get("length", "1") != "0")
                elif path == "/echo-headers":
                    self.answer(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
                else:
                    self.serve_file(path)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (size or time limits): expected in tests

        def answer(self, status: int, body: bytes, content_type: str = "application/octet-stream"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self._head_only:
                self.wfile.write(body)

        def serve_file(self, path: str):
            target = (server.dir / path.lstrip("/")).resolve()
            if not target.is_relative_to(server.dir.resolve()) or not target.is_file():
                self.answer(404, b"not found\n", "text/plain")
                return
            kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self.answer(200, target.read_bytes(), kind)

        def _trickle(self, chunks: int, interval: float, size: int):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(chunks * size))
            self.end_headers()
            for _ in range(chunks):
                self.wfile.write(b"\0" * size)
                self.wfile.flush()
                if not server.sleep(interval):
                    return

        def _huge(self, total: int, with_length: bool):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if with_length:
                self.send_header("Content-Length", str(total))
            self.end_headers()
            block = b"\0" * 65536
            sent = 0
            while sent < total and not server._stop.is_set():
                n = min(len(block), total - sent)
                self.wfile.write(block[:n])
                sent += n

    return Handler


@pytest.fixture
def image_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving `tmp_path/"served"`; see `ImageServer`."""
    with ImageServer(tmp_path / "served") as server:
        yield server


# --- real_images ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATASETS / f"{name}.npz") as data:
        return data["train_images"][:16].copy(), data["train_labels"][:16, 0].copy()


@dataclass
class RealImages:
    """Real medical images written as files.

    Names are `<dataset>_<i>.<ext>` for dataset in ("retina", "pneumonia"), i in range(4), ext in
    ("png", "jpg"): retina images are 28x28 RGB, pneumonia images 28x28 greyscale (PIL mode "L").
    - `files[name]`: the file's path (all in `dir`).
    - `arrays[name]`: the uint8 array that was written (JPEG is lossy: decoded pixels differ a little).
    - `labels[name]`: the dataset's class label of that image.
    - `bytes(name)`: the file's bytes.
    """
    dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)

    def bytes(self, name: str) -> bytes:
        return self.files[name].read_bytes()


def write_real_images(folder: Path, per_dataset: int = 4) -> RealImages:
    folder.mkdir(parents=True, exist_ok=True)
    out = RealImages(dir=folder)
    for short, name in (("retina", "retinamnist"), ("pneumonia", "pneumoniamnist")):
        images, labels = _dataset(name)
        for i in range(per_dataset):
            for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
                key = f"{short}_{i}.{ext}"
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format=fmt)
                out.files[key] = folder / key
                out.files[key].write_bytes(buf.getvalue())
                out.arrays[key] = images[i]
                out.labels[key] = int(labels[i])
    return out


@pytest.fixture
def real_images(tmp_path) -> RealImages:
    """Real PNG and JPEG files from RetinaMNIST (RGB) and PneumoniaMNIST (grey); see `RealImages`."""
    return write_real_images(tmp_path / "real_images")
