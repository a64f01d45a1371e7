"""peal_backend.images against a real HTTP server on loopback and real PNG/JPEG files."""
from __future__ import annotations

import base64
import io
import logging
import os
import pickle
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

from peal_backend.config import Settings
from peal_backend.images import (IMAGENET_MEAN, IMAGENET_STD, ImageError, ImageFetcher, content_hash,
                                 decode_image, preprocess, safe_url, to_pil)
from tests.conftest import ImageServer, free_port

TOKEN = "s3cr3t-api-token"


def make_settings(server, tmp_path, **overrides) -> Settings:
    values = dict(label_studio_url=server.base_url, cache_dir=str(tmp_path / "cache"), fetch_timeout=2.0)
    values.update(overrides)
    return Settings(**values)


class AuthCounter:
    """An auth_headers callable that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"Authorization": f"Token {TOKEN}"}


@pytest.fixture
def fetcher_for(image_server, tmp_path):
    def build(auth=None, **overrides):
        return ImageFetcher(make_settings(image_server, tmp_path, **overrides), auth)
    return build


def add_redirect(server, path: str, location: str, code: int = 302) -> None:
    """Make `server` answer `path` with a redirect to `location` (under a media route, where the token goes)."""
    def redirect(handler, query):
        handler.send_response(code)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    server.routes[path] = redirect


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is rewritten to claim width x height (CRC fixed up)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) width(4) height(4) ...
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


# --- fetching real images --------------------------------------------------------------------------

def test_fetch_png_is_pixel_exact(image_server, real_images, fetcher_for):
    url = image_server.add("retina_0.png", real_images.files["retina_0.png"])
    image = fetcher_for().fetch(url)
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image), real_images.arrays["retina_0.png"])


def test_fetch_jpeg_is_close(image_server, real_images, fetcher_for):
    url = image_server.add("retina_1.jpg", real_images.files["retina_1.jpg"])
    image = fetcher_for().fetch(url)
    assert image.mode == "RGB" and image.size == (28, 28)
    diff = np.abs(np.asarray(image, dtype=float) - real_images.arrays["retina_1.jpg"])
    assert diff.mean() < 8  # lossy, but the same picture


def test_fetch_bytes_returns_the_file(image_server, real_images, fetcher_for):
    url = image_server.add("p.jpg", real_images.files["pneumonia_0.jpg"])
    assert fetcher_for().fetch_bytes(url) == real_images.bytes("pneumonia_0.jpg")


@pytest.mark.parametrize("name", ["pneumonia_2.png", "pneumonia_2.jpg"])
def test_greyscale_becomes_rgb(image_server, real_images, fetcher_for, name):
    assert Image.open(real_images.files[name]).mode == "L"
    url = image_server.add(name, real_images.files[name])
    pixels = np.asarray(fetcher_for().fetch(url))
    assert pixels.shape == (28, 28, 3)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    if name.endswith(".png"):
        np.testing.assert_array_equal(pixels[..., 0], real_images.arrays[name])


# --- Label Studio URLs and auth --------------------------------------------------------------------

def test_relative_upload_url_joined_with_auth(image_server, real_images, fetcher_for):
    image_server.add("data/upload/3/abc-img.png", real_images.files["retina_2.png"])
    auth = AuthCounter()
    image = fetcher_for(auth).fetch("/data/upload/3/abc-img.png")
    np.testing.assert_array_equal(np.asarray(image), real_images.arrays["retina_2.png"])
    [seen] = image_server.requests
    assert seen.path == "/data/upload/3/abc-img.png"
    assert seen.headers["authorization"] == f"Token {TOKEN}"
    assert auth.calls == 1


def test_label_studio_under_a_path_prefix(image_server, real_images, fetcher_for):
    image_server.add("ls/data/upload/1/x.png", real_images.files["retina_0.png"])
    fetcher = fetcher_for(AuthCounter(), label_studio_url=image_server.base_url + "/ls/")
    fetcher.fetch("/data/upload/1/x.png")
    assert image_server.count("/ls/data/upload/1/x.png") == 1


def test_local_files_url(image_server, real_images, fetcher_for):
    def local_files(handler, query):  # Label Studio serves ?d=<path under its document root>
        handler.serve_file("/root/" + query["d"])
    image_server.routes["/data/local-files/"] = local_files
    image_server.add("root/sub/img.png", real_images.files["pneumonia_1.png"])
    image = fetcher_for(AuthCounter()).fetch("/data/local-files/?d=sub/img.png")
    assert image.size == (28, 28)
    assert image_server.requests[0].headers["authorization"] == f"Token {TOKEN}"


def test_auth_headers_not_sent_to_other_hosts(image_server, real_images, fetcher_for):
    url = image_server.add("data/upload/1/a.png", real_images.files["retina_0.png"])
    other = image_server.url("/data/upload/1/a.png", host="localhost")
    auth = AuthCounter()
    fetcher = fetcher_for(auth, allowed_hosts=f"localhost:{image_server.port}")
    fetcher.fetch(other)
    fetcher.fetch(url)
    first, second = image_server.requests
    assert first.host.startswith("localhost") and "authorization" not in first.headers
    assert second.host.startswith("127.0.0.1") and second.headers["authorization"] == f"Token {TOKEN}"
    assert auth.calls == 1


def test_auth_headers_not_forwarded_on_redirect(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    add_redirect(image_server, "/data/upload/1/moved.png", image_server.url("/a.png", host="localhost"))
    fetcher = fetcher_for(AuthCounter(), allowed_hosts="localhost")
    fetcher.fetch("/data/upload/1/moved.png")
    hop, final = image_server.requests
    assert hop.headers["authorization"] == f"Token {TOKEN}"
    assert final.host.startswith("localhost") and "authorization" not in final.headers


# --- URLs that URL parsers read differently ----------------------------------------------------------

@pytest.fixture
def other_server(tmp_path):
    """A second loopback server: a host that must never see Label Studio's token."""
    with ImageServer(tmp_path / "other") as server:
        yield server


def tricky_url(connects_to, looks_like, path="/data/upload/1/0.png") -> str:
    """urllib.parse reads the host after the last `@` (`looks_like`); urllib3 ends it at the backslash
    and connects to `connects_to`."""
    return f"http://127.0.0.1:{connects_to.port}\\@127.0.0.1:{looks_like.port}{path}"


def test_backslash_url_never_carries_the_token_to_another_host(image_server, other_server, real_images, fetcher_for):
    image_server.add("data/upload/1/0.png", real_images.files["retina_0.png"])
    auth = AuthCounter()
    with pytest.raises(ImageError) as info:
        fetcher_for(auth).fetch(tricky_url(other_server, image_server))
    assert other_server.requests == [] and image_server.requests == [] and auth.calls == 0
    assert "backslash" in info.value.reason


def test_backslash_redirect_never_carries_the_token_to_another_host(image_server, other_server, fetcher_for):
    add_redirect(image_server, "/data/upload/1/moved.png", tricky_url(other_server, image_server))
    with pytest.raises(ImageError) as info:
        fetcher_for(AuthCounter()).fetch("/data/upload/1/moved.png")
    assert other_server.requests == []
    assert "redirected to" in info.value.reason and "backslash" in info.value.reason


def test_backslash_url_does_not_bypass_the_allow_list(image_server, other_server, real_images, fetcher_for):
    other_server.add("a.png", real_images.files["retina_0.png"])
    url = tricky_url(other_server, image_server, "/a.png").replace("@127.0.0.1:", "@localhost:")
    with pytest.raises(ImageError) as info:
        fetcher_for(allowed_hosts=f"localhost:{image_server.port}").fetch(url)
    assert other_server.requests == []
    assert "backslash" in info.value.reason


# --- the token goes only to Label Studio's media routes ---------------------------------------------

@pytest.mark.parametrize("url", [
    "/api/projects/1/next",
    "/api/current-user/whoami",
    "/data/upload/../../api/users/",
    "/data/upload/%2e%2e/%2E%2E/api/users/",
    "/data/upload/1/..%2f..%2fapi/users/",
    "/data/local-files/../../api/users/?d=x.png",
    "/tasks/1/resolve/../../api/users/",
    "/data/uploadx/1.png",
])
def test_token_is_not_sent_to_label_studio_api_paths(image_server, fetcher_for, url):
    auth = AuthCounter()
    with pytest.raises(ImageError) as info:
        fetcher_for(auth).fetch(url)
    assert image_server.requests == [] and auth.calls == 0
    assert "media routes" in info.value.reason or "'..' segments" in info.value.reason


def test_redirect_to_a_label_studio_api_path_is_refused(image_server, fetcher_for):
    add_redirect(image_server, "/data/upload/1/moved.png", "/api/users/")
    with pytest.raises(ImageError, match="redirected to .*media routes"):
        fetcher_for(AuthCounter()).fetch("/data/upload/1/moved.png")
    assert image_server.count("/api/users/") == 0


def test_token_is_sent_to_storage_resolve_routes(image_server, real_images, fetcher_for):
    def resolve(handler, query):
        handler.serve_file("/bucket/a.png")
    image_server.routes["/tasks/12/resolve/"] = resolve
    image_server.add("bucket/a.png", real_images.files["retina_0.png"])
    fetcher_for(AuthCounter()).fetch("/tasks/12/resolve/?fileuri=czM6Ly9idWNrZXQvYS5wbmc=")
    assert image_server.requests[0].headers["authorization"] == f"Token {TOKEN}"


def test_without_a_token_other_label_studio_paths_are_fetched(image_server, real_images, fetcher_for):
    url = image_server.add("a.png", real_images.files["retina_0.png"])  # no credentials in play
    assert fetcher_for().fetch(url).size == (28, 28)


# --- the cache ---------------------------------------------------------------------------------------

def test_second_fetch_comes_from_disk_cache(image_server, real_images, fetcher_for, tmp_path):
    url = image_server.add("a.png", real_images.files["retina_3.png"])
    first = fetcher_for().fetch(url)
    second = fetcher_for().fetch(url)  # a new fetcher: the cache is on disk, not in memory
    assert image_server.count("/a.png") == 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    cached = sorted(os.path.join(d, f) for d, _, files in os.walk(tmp_path / "cache") for f in files)
    data = real_images.bytes("retina_3.png")
    # one blob by content, one URL entry pointing at it, the size ledger and its lock; no temp files left behind
    assert sorted(os.path.basename(p) for p in cached) == sorted([content_hash(data), content_hash(url.encode()),
                                                                 ".size", ".size.lock"])
    assert open(fetcher_for()._blob_path(content_hash(data)), "rb").read() == data


def test_fetch_content_is_the_file_checked_once_then_read_from_the_cache(image_server, real_images, fetcher_for):
    data = real_images.bytes("retina_3.png")
    url = image_server.add("c.png", data)
    assert fetcher_for().fetch_content(url) == data  # fetched, checked to decode, cached
    assert fetcher_for().fetch_content(url) == data  # a new fetcher: from the disk cache
    assert image_server.count("/c.png") == 1
    text = image_server.add("c.txt", b"this is text, not a picture\n")
    with pytest.raises(ImageError):  # never cached unchecked
        fetcher_for().fetch_content(text)


def test_failures_are_not_cached(image_server, fetcher_for, tmp_path):
    url = image_server.add("notes.png", b"this is text, not a picture\n")
    fetcher = fetcher_for()
    for _ in range(2):
        with pytest.raises(ImageError):
            fetcher.fetch(url)
    assert image_server.count("/notes.png") == 2
    assert not (tmp_path / "cache").exists() or not any(files for _, _, files in os.walk(tmp_path / "cache"))


def test_corrupt_cache_entry_is_refetched(image_server, real_images, fetcher_for):
    url = image_server.add("a.png", real_images.files["retina_0.png"])
    fetcher = fetcher_for()
    fetcher.fetch(url)
    blob = fetcher._blob_path(open(fetcher._url_path(url)).read())
    with open(blob, "wb") as f:
        f.write(b"garbage")
    image = fetcher.fetch(url)
    np.testing.assert_array_equal(np.asarray(image), real_images.arrays["retina_0.png"])
    assert image_server.count("/a.png") == 2
    assert open(blob, "rb").read() == real_images.bytes("retina_0.png")


def cache_bytes(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def test_the_image_cache_stores_content_once_and_stays_under_its_bound(image_server, real_images, fetcher_for, tmp_path):
    """200 `?v=N` variants of one image used to be 200 copies; distinct images past PEAL_IMAGE_CACHE_MB
    evict the least recently used."""
    big = real_images.bytes("retina_0.png")
    url = image_server.add("same.png", real_images.files["retina_0.png"])
    fetcher = fetcher_for(image_cache_mb=0.05)  # 50 kB
    for v in range(200):
        fetcher.fetch(f"{url}?v={v}")
    blobs = [f for _, _, files in os.walk(tmp_path / "cache" / "images" / "blobs") for f in files]
    assert len(blobs) == 1 and cache_bytes(tmp_path / "cache" / "images" / "blobs") == len(big)

    names = [f"img{i}.png" for i in range(120)]
    for i, name in enumerate(names):  # distinct contents: the PNG bytes with a different trailing byte
        path = tmp_path / name
        path.write_bytes(big + bytes([i]))
        fetcher.fetch(image_server.add(name, path))
    fetcher.evict()
    assert cache_bytes(tmp_path / "cache" / "images" / "blobs") <= 0.05e6
    # the ledger every process checks the bound against holds the size on disk
    assert int((tmp_path / "cache" / "images" / ".size").read_text()) == cache_bytes(tmp_path / "cache" / "images" / "blobs")
    first = image_server.add(names[0], tmp_path / names[0])
    fetcher.fetch(first)  # evicted long ago: fetched again
    assert image_server.count(f"/{names[0]}") == 2


def test_concurrent_fetches_from_threads(image_server, real_images, fetcher_for):
    names = [n for n in real_images.files if n.endswith(".png")]
    urls = [image_server.add(n, real_images.files[n]) for n in names]
    fetcher = fetcher_for()
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(fetcher.fetch, urls))
    for name, image in zip(names, images):
        assert np.asarray(image).shape == (28, 28, 3), name


# --- refused URLs ------------------------------------------------------------------------------------

def test_disallowed_host_is_refused_without_a_request(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    with pytest.raises(ImageError, match="host 'localhost:.*' is not allowed.*PEAL_ALLOWED_HOSTS"):
        fetcher_for().fetch(image_server.url("/a.png", host="localhost"))
    assert image_server.requests == []


def test_allowed_host_star_allows_any(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    assert fetcher_for(allowed_hosts="*").fetch(image_server.url("/a.png", host="localhost")).size == (28, 28)


def test_allowed_host_with_other_port_is_refused(image_server, fetcher_for):
    with pytest.raises(ImageError, match="not allowed"):
        fetcher_for(allowed_hosts=f"localhost:{image_server.port + 1}").fetch(
            image_server.url("/a.png", host="localhost"))


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("ftp://127.0.0.1/a.png", "scheme 'ftp' is not allowed"),
    ("gopher://127.0.0.1/a.png", "scheme 'gopher' is not allowed"),
    ("data:text/plain;base64,aGVsbG8=", "only data:image"),
    ("img.png", "not an absolute http"),
    ("", "empty or missing URL"),
    # URLs that URL parsers read differently (see tricky_url)
    ("http://127.0.0.1:1\tx/a.png", "control character"),
    ("http://user:pw@127.0.0.1:1/a.png", "credentials"),
    ("http://127.0.0.1:1\\/a.png", "backslash"),
])
def test_refused_schemes_and_malformed_urls(fetcher_for, url, reason):
    with pytest.raises(ImageError, match=reason):
        fetcher_for(allowed_hosts="*").fetch(url)


def test_data_uri_png_is_decoded(fetcher_for, real_images):
    uri = "data:image/png;base64," + base64.b64encode(real_images.bytes("retina_0.png")).decode()
    image = fetcher_for().fetch(uri)
    np.testing.assert_array_equal(np.asarray(image), real_images.arrays["retina_0.png"])


def test_data_uri_over_byte_limit_is_refused(fetcher_for, real_images):
    uri = "data:image/png;base64," + base64.b64encode(real_images.bytes("retina_0.png")).decode()
    with pytest.raises(ImageError, match="too large"):
        fetcher_for(max_image_bytes=100).fetch(uri)


def test_redirect_to_disallowed_host_is_refused(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    add_redirect(image_server, "/data/upload/1/moved.png", image_server.url("/a.png", host="localhost"))
    with pytest.raises(ImageError, match="redirected to .*localhost.* is not allowed"):
        fetcher_for(AuthCounter()).fetch(image_server.url("/data/upload/1/moved.png"))
    assert [r.path.split("?")[0] for r in image_server.requests] == ["/data/upload/1/moved.png"]


def test_redirect_to_file_scheme_is_refused(image_server, fetcher_for):
    with pytest.raises(ImageError, match="scheme 'file' is not allowed"):
        fetcher_for(allowed_hosts="*").fetch(image_server.url("/redirect?to=file:///etc/passwd"))


def test_redirect_to_allowed_host_is_followed(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    image = fetcher_for().fetch(image_server.url("/redirect?code=301&to=/a.png"))  # relative Location
    assert image.size == (28, 28)
    assert image_server.count("/a.png") == 1


def test_too_many_redirects(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])

    def chain(hops: int) -> str:
        url = "/a.png"
        for _ in range(hops):
            url = "/redirect?to=" + quote(url, safe="")
        return image_server.url(url)

    assert fetcher_for().fetch(chain(3)).size == (28, 28)
    with pytest.raises(ImageError, match="more than 3 redirects"):
        fetcher_for().fetch(chain(4))


# --- HTTP failures and bad bodies -------------------------------------------------------------------

def test_404(image_server, fetcher_for):
    with pytest.raises(ImageError, match=r"HTTP 404") as info:
        fetcher_for().fetch(image_server.url("/missing.png"))
    assert info.value.reason.startswith("HTTP 404") and info.value.url == image_server.url("/missing.png")


def test_401_from_label_studio_hints_at_the_token(image_server, fetcher_for):
    image_server.routes["/data/upload/1/a.png"] = lambda handler, query: handler.answer(401, b"no\n")
    with pytest.raises(ImageError, match=r"HTTP 401.*LABEL_STUDIO_API_KEY"):
        fetcher_for(AuthCounter()).fetch("/data/upload/1/a.png")


def test_connection_refused(fetcher_for):
    url = f"http://127.0.0.1:{free_port()}/a.png?token=SECRETVALUE"
    with pytest.raises(ImageError, match="request failed") as info:
        fetcher_for(allowed_hosts="*").fetch(url)
    assert "SECRETVALUE" not in str(info.value)


def test_slow_server_times_out(image_server, real_images, fetcher_for):
    image_server.add("a.png", real_images.files["retina_0.png"])
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        fetcher_for(fetch_timeout=0.3).fetch(image_server.url("/slow/a.png?delay=5"))
    assert time.monotonic() - start < 3


def test_trickling_body_hits_the_overall_deadline(image_server, fetcher_for):
    # Each chunk arrives well within the per-read timeout; only the overall deadline stops it.
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out .* reading the body"):
        fetcher_for(fetch_timeout=0.5).fetch(image_server.url("/trickle?chunks=50&interval=0.1"))
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("length", ["1", "0"])
def test_oversized_body_is_refused(image_server, fetcher_for, length):
    with pytest.raises(ImageError, match="too large.*PEAL_MAX_IMAGE_BYTES"):
        fetcher_for(max_image_bytes=200_000).fetch(image_server.url(f"/huge?bytes=50000000&length={length}"))


def test_empty_body(image_server, fetcher_for):
    url = image_server.add("empty.png", b"")
    with pytest.raises(ImageError, match="empty body"):
        fetcher_for().fetch(url)


def test_truncated_png(image_server, real_images, fetcher_for):
    data = real_images.bytes("retina_0.png")
    url = image_server.add("cut.png", data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        fetcher_for().fetch(url)


def test_truncated_jpeg(image_server, real_images, fetcher_for):
    data = real_images.bytes("retina_0.jpg")  # a 28x28 JPEG: half of it ends inside the header
    url = image_server.add("cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt image header .*Truncated"):
        fetcher_for().fetch(url)
    buf = io.BytesIO()  # a larger JPEG cut inside its pixel data
    to_pil(real_images.arrays["retina_0.jpg"]).resize((256, 256)).save(buf, format="JPEG")
    url = image_server.add("cut2.jpg", buf.getvalue()[: len(buf.getvalue()) * 3 // 4])
    with pytest.raises(ImageError, match="corrupt or truncated JPEG image"):
        fetcher_for().fetch(url)


def test_text_file_is_not_an_image(image_server, fetcher_for):
    url = image_server.add("readme.txt", b"hello, I am text\n")
    with pytest.raises(ImageError) as info:
        fetcher_for().fetch(url)
    assert str(info.value) == (f"image {url!r}: not an image (cannot identify image file); "
                               "server sent Content-Type text/plain")


def test_decompression_bomb_refused_from_header(image_server, fetcher_for):
    url = image_server.add("bomb.png", png_declaring(9000, 9000))  # 81 Mpx: under Pillow's own limits
    with pytest.raises(ImageError, match=r"too many pixels: 9000x9000 = 81000000 > 10000000"):
        fetcher_for(max_image_pixels=10_000_000).fetch(url)


def test_huge_declared_size_refused(image_server, fetcher_for):
    url = image_server.add("bomb.png", png_declaring(20000, 20000))
    with pytest.raises(ImageError, match="too many pixels"):
        fetcher_for().fetch(url)


# --- messages and logs keep secrets out ---------------------------------------------------------------

def test_messages_and_logs_hide_secrets(image_server, real_images, fetcher_for, caplog):
    caplog.set_level(logging.DEBUG)
    image_server.add("data/upload/1/a.png", real_images.files["retina_0.png"])
    fetcher_for(AuthCounter()).fetch("/data/upload/1/a.png?sig=SECRETSIG")
    with pytest.raises(ImageError) as info:
        fetcher_for(AuthCounter()).fetch("/data/upload/1/missing.png?X-Amz-Signature=SECRETSIG&d=sub/x.png")
    message = str(info.value)
    assert "SECRETSIG" not in message and "X-Amz-Signature=***" in message and "d=sub/x.png" in message
    with pytest.raises(ImageError) as info:
        fetcher_for().fetch("http://user:PASSWORD@localhost:1/a.png")
    assert "PASSWORD" not in str(info.value)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("peal_backend"))
    assert "fetched" in ours and "sig=***" in ours
    assert "SECRETSIG" not in ours and TOKEN not in ours and "PASSWORD" not in ours


def test_safe_url():
    assert safe_url("https://u:p@h.example/a.png?sig=abc&d=x/y.png#frag") == "https://h.example/a.png?sig=***&d=x/y.png"
    assert safe_url("/data/local-files/?d=sub/img.png") == "/data/local-files/?d=sub/img.png"


@pytest.mark.parametrize("query", [
    "X%2DAmz%2DSignature=SECRETSIG",   # the key percent-encoded
    "X-Amz-Signature%3DSECRETSIG",     # the = percent-encoded: one odd key, no value
    "SECRETSIG",                       # a bare token
    "sig=SECRET%53IG",                 # the value percent-encoded
])
def test_percent_encoded_query_secrets_are_hidden(fetcher_for, query, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}/a.png?{query}&d=sub/x.png"  # connection refused
    with pytest.raises(ImageError) as info:
        fetcher_for(allowed_hosts="*").fetch(url)
    text = str(info.value) + "\n" + caplog.text
    assert "request failed" in text and "SECRET" not in text and "d=sub/x.png" in str(info.value)


def test_image_error_pickles():
    error = ImageError("http://h/a.png?token=abc", "HTTP 404")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == "image 'http://h/a.png?token=***': HTTP 404"
    assert (copy.url, copy.reason) == (error.url, error.reason)


# --- decode_image ---------------------------------------------------------------------------------------

def test_decode_16_bit_greyscale_is_stretched():
    values = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    image = decode_image(png_bytes(Image.fromarray(values)), max_pixels=100)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], [[0, 85], [170, 255]])


def test_decode_transparent_pixels_become_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent black
    pixels = np.asarray(decode_image(png_bytes(Image.fromarray(rgba)), max_pixels=100))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[1, 1]) == (255, 255, 255)


def test_decode_applies_exif_orientation(real_images):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), max_pixels=10_000).size == (20, 40)


def halves(mode: str, size=(3000, 1000)) -> Image.Image:
    """A `mode` image whose left half is dark and right half light."""
    dark, light = {"1": (0, 1), "I;16": (1000, 5000), "P": (0, 1), "L": (0, 255),
                   "RGB": ((0, 0, 0), (255, 255, 255)), "RGBA": ((0, 0, 0, 255), (255, 255, 255, 255))}[mode]
    image = Image.new(mode, size, dark)
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 255, 255])
    image.paste(light, (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "RGB", "RGBA"])
def test_large_png_is_decoded_reduced(mode):
    # Decoding full-size 10000x10000 PNGs to RGB took +552 MiB (1-bit) and +2.7 GiB (16-bit) per image
    image = decode_image(png_bytes(halves(mode)), max_pixels=10**8, max_side=256)
    assert image.mode == "RGB" and image.size == (273, 91)  # reduced 11x: under 2 x 256, aspect kept
    pixels = np.asarray(image)
    assert (pixels[:, :130] == 0).all() and (pixels[:, 143:] == 255).all()


def test_large_jpeg_is_decoded_reduced_and_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    halves("RGB", (2000, 1000)).save(buf, format="JPEG", exif=exif)
    image = decode_image(buf.getvalue(), max_pixels=10**8, max_side=100)
    assert image.size == (63, 125)  # drafted to 1/8 (250x125), reduced 2x, then turned upright
    pixels = np.asarray(image, dtype=int)
    assert (pixels[:56] < 25).all() and (pixels[70:] > 230).all()  # turned clockwise: the light right half is below


def test_small_images_are_not_reduced(real_images):
    image = decode_image(real_images.bytes("retina_0.png"), max_pixels=10**8, max_side=15)
    np.testing.assert_array_equal(np.asarray(image), real_images.arrays["retina_0.png"])  # 28 < 2 x 15


def test_fetcher_decodes_to_decode_max_side(image_server, fetcher_for):
    url = image_server.add("big.png", png_bytes(halves("1", (2048, 2048))))
    assert fetcher_for(decode_max_side=256).fetch(url).size == (256, 256)
    assert fetcher_for(decode_max_side=256).fetch(url).size == (256, 256)  # from the cache too


def test_decode_max_side_below_image_size_is_refused():
    from peal_backend.config import SettingsError
    with pytest.raises(SettingsError, match="PEAL_DECODE_MAX_SIDE=100: .*at least PEAL_IMAGE_SIZE"):
        Settings(decode_max_side=100, image_size=224)
    with pytest.raises(SettingsError, match="PEAL_DECODE_MAX_SIDE=0"):
        Settings.from_env({"PEAL_DECODE_MAX_SIDE": "0"})


def test_decode_names_the_source():
    with pytest.raises(ImageError, match=r"^image 'task 7': not an image"):
        decode_image(b"\x00" * 100, max_pixels=100, source="task 7")


# --- content_hash, to_pil, preprocess ------------------------------------------------------------------

def test_content_hash():
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_to_pil_shapes(shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    pixels = np.asarray(to_pil(array))
    assert pixels.shape == (5, 7, 3)
    expected = array if shape[-1:] == (3,) else np.repeat(array.reshape(5, 7, 1), 3, axis=2)
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 7), dtype=np.float32), "uint8"),
    (np.zeros((5, 7, 4), dtype=np.uint8), "HxW"),
    (np.zeros((2, 5, 7, 3), dtype=np.uint8), "HxW"),
    (np.zeros((0, 7), dtype=np.uint8), "HxW"),
])
def test_to_pil_rejects_bad_arrays(array, message):
    with pytest.raises(ValueError, match=message):
        to_pil(array)


def test_preprocess_constant_colour_numerics():
    colour = (255, 128, 0)
    out = preprocess([Image.new("RGB", (40, 30), colour)], 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((16, 16), expected), atol=1e-5, rtol=0)


def test_preprocess_without_resize_matches_formula(real_images):
    array = real_images.arrays["retina_0.png"]
    out = preprocess([to_pil(array)], 28)
    expected = (array / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_preprocess_mixed_sizes_and_modes(real_images):
    images = [Image.open(real_images.files["pneumonia_0.png"]), to_pil(real_images.arrays["retina_0.png"]),
              Image.new("RGB", (300, 100), (10, 20, 30))]
    out = preprocess(images, 32)
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out[0, 0], out[0, 1] * IMAGENET_STD[1] / IMAGENET_STD[0]
                               + (IMAGENET_MEAN[1] - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5, rtol=0)


def test_preprocess_resizes_content_not_just_shape():
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, 32:] = 255  # black left half, white right half
    out = preprocess([to_pil(half)], 32)[0]
    assert (out[:, :, :14] < 0).all() and (out[:, :, 18:] > 0).all()


def test_preprocess_empty_and_bad_input():
    assert preprocess([], 8).shape == (0, 3, 8, 8)
    assert preprocess([Image.new("RGB", (4, 4))], np.int64(8)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="size"):
        preprocess([Image.new("RGB", (4, 4))], 0)
    with pytest.raises(TypeError, match="item 1"):
        preprocess([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3))], 8)
