"""Safe fetching, decoding and preprocessing of images.

Task images are URLs: `/data/upload/...` and `/data/local-files/?d=...` (relative, served by Label
Studio, need its API token) or absolute `http(s)://...`. `ImageFetcher` turns them into RGB images
under a few rules that keep a backend exposed to arbitrary task data safe:

- only http and https (and inline `data:image/...;base64,` URIs); never file://, ftp://, ...
- a URL is parsed once, by urllib3's parser (the one that connects), and requested in that canonical
  form; URLs that parsers read differently (backslashes, control characters, user@ credentials) are
  refused;
- only the Label Studio host and the hosts in PEAL_ALLOWED_HOSTS (`*` = any, `*.example.com` =
  its subdomains); redirects (at most 3) are followed by hand and re-checked at every hop;
- Label Studio's auth headers go only to Label Studio's own origin, never to a redirect elsewhere, and
  there only to its media routes (/data/upload/, /data/local-files/, /tasks|projects/<id>/resolve/);
  with a token, other paths on Label Studio (its API) and paths with `..` segments are refused;
- bodies are streamed under a byte limit and an overall deadline;
- width x height is checked from the image header before any pixel is decoded (decompression bombs),
  and a large image is decoded reduced to about PEAL_DECODE_MAX_SIDE (JPEG at up to 1/8 scale; others
  reduced right after decoding), so one is never held full-size as RGB;
- URLs in messages and logs have their credentials and query values hidden.

Fetched bodies are cached on disk by content (a URL points at the sha256 of what it gave), bounded in
size (PEAL_IMAGE_CACHE_MB, least recently used first out), so a URL is downloaded once.
`preprocess` turns RGB images into the normalised tensor DINOv2 expects.
"""
from __future__ import annotations

import base64
import fcntl
import binascii
import hashlib
import io
import logging
import math
import numbers
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Sequence
from urllib.parse import quote, unquote_plus, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
import torch
import urllib3
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url
from PIL import Image, UnidentifiedImageError

from .config import Settings, hide_url_secrets

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_REDIRECTS = 3
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
# Query parameters that are paths, not secrets: shown as they are in messages.
_PLAIN_QUERY_KEYS = {"d", "fileuri"}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_AMBIGUOUS = re.compile(r"[\x00-\x1f\x7f\\]")
# Label Studio's media routes, below its base path: the only paths its API token is sent to.
_MEDIA_ROUTES = re.compile(r"/data/upload/.+|/data/local-files/?|/(tasks|projects)/\d+/(resolve|presign)/?")
_ENCODED_DOT_OR_SLASH = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


class ImageError(Exception):
    """An image could not be fetched or decoded. `url` is safe to show (secrets hidden)."""

    def __init__(self, url: str, reason: str):
        self.url = safe_url(url)
        self.reason = reason
        super().__init__(f"image {self.url!r}: {reason}")

    def __reduce__(self):  # picklable (job queues pickle exceptions) despite the two-argument __init__
        return (type(self), (self.url, self.reason))


# --- URLs ----------------------------------------------------------------------------------------

def safe_url(url: str) -> str:
    """`url` with user:password, query values (but Label Studio's `d=` paths) and fragment hidden.

    Query keys are read percent-decoded (`X%2DAmz%2DSignature` is X-Amz-Signature); a key that is not
    a plain name, or a bare `?token` without `=`, is hidden too.
    """
    if not url or url.startswith("data:"):
        return url[:40] + ("..." if len(url) > 40 else "")
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
        pairs = []
        for field in filter(None, parts.query.split("&")):
            raw_key, eq, raw_value = field.partition("=")
            key = unquote_plus(raw_key)
            if not eq:
                pairs.append("***")
            elif key.lower() in _PLAIN_QUERY_KEYS:
                pairs.append(f"{key}={quote(unquote_plus(raw_value), safe='/')}")
            else:
                pairs.append(f"{key if _PLAIN_KEY.fullmatch(key) else '***'}=***")
        return urlunsplit((parts.scheme, netloc, parts.path, "&".join(pairs), ""))
    except ValueError:
        return "<unparseable url>"


class _SchemeError(ValueError):
    """The URL's scheme is not http or https."""


class _Target:
    """An absolute http(s) URL as urllib3 (hence requests) reads it: the parser that connects.

    Checking the host with one parser and connecting with another let a task URL such as
    `http://evil:81\\@label-studio/data/upload/1/a.png` pass as Label Studio (Python's urlsplit takes the
    host after the last `@`) while urllib3 connected to `evil` (it ends the host at the backslash), with
    the API token. So a URL is parsed once, here; `url` is its canonical form, the one requested, and
    what the parsers could disagree on (backslashes, control characters, user@ credentials) is refused.
    """

    def __init__(self, url: str, credentials_ok: bool = False):
        bad = _AMBIGUOUS.search(url)
        if bad:
            what = "a backslash" if bad.group() == "\\" else f"control character {bad.group()!r}"
            raise ValueError(f"URL contains {what}; refused because URL parsers disagree on such URLs")
        try:
            parsed = parse_url(url)
        except LocationParseError as exc:
            raise ValueError(f"unparseable URL ({str(exc).split(': ', 1)[-1][:100]})") from None
        self.scheme = (parsed.scheme or "").lower()
        if not parsed.scheme or "://" not in url:
            raise ValueError("not an absolute http(s) URL")
        if self.scheme not in _DEFAULT_PORTS:
            raise _SchemeError(f"scheme {self.scheme!r} is not allowed (only http and https)")
        self.auth = parsed.auth
        if self.auth is not None and not credentials_ok:
            raise ValueError("credentials (user@host) in the URL are not allowed")
        if not parsed.host:
            raise ValueError("not an absolute http(s) URL (no host)")
        self.host = parsed.host.lower()
        self.port = parsed.port or _DEFAULT_PORTS[self.scheme]
        self.path = parsed.path or "/"
        # urllib3 removes `.`/`..` segments and servers decode %2e, %2f: either way a path that looked
        # like a media route can reach another one (/data/upload/../../api/users/).
        raw_path = urlsplit(url).path
        self.traverses = (any(segment in (".", "..") for segment in raw_path.split("/"))
                          or bool(_ENCODED_DOT_OR_SLASH.search(raw_path)))
        self.url = parsed._replace(fragment=None).url
        # requests' adapter picks its connection pool with urllib.parse; both must see the same host.
        other = urlsplit(self.url)
        if ((other.hostname or "").lower(), other.port or _DEFAULT_PORTS[self.scheme]) != (self.host.strip("[]"), self.port):
            raise ValueError("URL parsers disagree on its host; refused")

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def _host_matches(entry: str, host: str, port: int) -> bool:
    """Does one PEAL_ALLOWED_HOSTS entry (`*`, `host`, `host:port`, `*.domain`) allow host:port?"""
    if entry == "*":
        return True
    parts = urlsplit("//" + entry)  # handles host:port and [ipv6]:port alike
    want_host = (parts.hostname or "").lower()
    try:
        want_port = parts.port
    except ValueError:
        return False
    if want_port is not None and want_port != port:
        return False
    if want_host.startswith("*."):
        return host.endswith(want_host[1:])
    return host == want_host


# --- decoding ------------------------------------------------------------------------------------

def content_hash(data: bytes) -> str:
    """sha256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, *, max_pixels: int, source: str = "", max_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB image; ImageError (naming `source`) if they are not a usable image.

    The pixel count is checked from the header before decoding. With `max_side`, a larger image is
    returned reduced by a whole factor (box filter, aspect kept) so that its longer side is under
    2 x max_side: a 12 KB PNG can declare 100 M pixels, and a full-size RGB copy of it (plus the float
    copies that 16-bit images need) took gigabytes. JPEGs are decoded reduced (up to 1/8) in the first
    place; other formats are decoded full-size in their own mode, reduced, and only then converted.
    EXIF orientation is applied (browsers, hence annotators, see images upright); transparency is
    composited on white; 16-bit and float images are stretched from their own min..max to 0..255.
    """
    if not data:
        raise ImageError(source, "empty body")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(source, "not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, coarser guard fired first
        raise ImageError(source, f"too many pixels (decompression-bomb guard: {exc})") from None
    except Exception as exc:  # Pillow plugins raise many types on malformed headers
        raise ImageError(source, f"corrupt image header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(source, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(source, f"too many pixels: {width}x{height} = {width * height} > {max_pixels} "
                                 "(decompression-bomb guard, PEAL_MAX_IMAGE_PIXELS)")
    try:
        if max_side and max(width, height) >= 2 * max_side:
            image.draft(None, _reduced_size(image.size, max(width, height) / max_side))  # JPEG only; a no-op otherwise
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION)  # read before _shrink: a resized copy has no EXIF
        if max_side:
            image = _shrink(image, max_side)
        image = _to_rgb(image)
        return image.transpose(_EXIF_TRANSPOSE[orientation]) if orientation in _EXIF_TRANSPOSE else image
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise ImageError(source, f"corrupt or truncated {image.format or ''} image "
                                 f"({type(exc).__name__}: {exc})".replace("  ", " ")) from None


_EXIF_ORIENTATION = 0x0112
# EXIF orientation value -> the transpose that shows the image upright (values from the EXIF standard)
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _reduced_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, math.ceil(size[0] / factor)), max(1, math.ceil(size[1] / factor))


# Modes Image.reduce handles; the others are converted (a strip at a time) to the mode given here.
_REDUCIBLE = {"L", "LA", "La", "I", "F", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "PA"}
_STRIP_PIXELS = 1 << 20


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """`image` box-filtered down by a whole factor until its longer side is under 2 x max_side."""
    factor = max(image.size) // max_side
    if factor < 2:
        return image
    if image.mode in _REDUCIBLE:
        return image.reduce(factor)
    # "1", "P", 16-bit: a full-size converted copy would cost up to 4 bytes a pixel more (the 100 MB
    # "1" image would take another 300 MB as RGB), so convert and reduce strips of whole boxes instead.
    mode = {"1": "L", "P": "RGBA" if "transparency" in image.info else "RGB"}.get(
        image.mode, "I" if image.mode.startswith("I;16") else "RGB")
    width, height = image.size
    out = Image.new(mode, _reduced_size(image.size, factor))
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height))).convert(mode)
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8))  # 2-D uint8 -> mode "L"
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def to_pil(array: np.ndarray) -> Image.Image:
    """A uint8 HxW, HxWx1 or HxWx3 array as an RGB PIL image."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"to_pil: expected a uint8 array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ValueError(f"to_pil: expected shape HxW, HxWx1 or HxWx3, got {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.convert("RGB") if image.mode != "RGB" else image


# --- preprocessing -------------------------------------------------------------------------------

def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32: each image squashed to size x size (bicubic), scaled to [0, 1] and
    normalised with the ImageNet mean and std, as DINOv2 expects."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError(f"preprocess: size must be a positive int, got {size!r}")
    size = int(size)
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess: item {i} is a {type(image).__name__}, not a PIL image")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        batch[i] = np.asarray(image, dtype=np.float32)
    batch *= 1.0 / 255.0
    batch -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    batch /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


# --- fetching ------------------------------------------------------------------------------------

class ImageFetcher:
    """Fetch task images by URL under the rules in the module docstring, with an on-disk cache.

    `auth_headers` (e.g. `LabelStudio.auth_headers`) is called for each request to Label Studio's own
    origin, and only then; its exceptions propagate (an auth failure is not a bad image).
    Safe to share between threads (one requests.Session per thread).
    """

    def __init__(self, settings: Settings, auth_headers: Callable[[], dict] | None = None):
        self.settings = settings
        self.auth_headers = auth_headers
        self.base_url = settings.label_studio_url.rstrip("/")
        try:
            base = _Target(self.base_url, credentials_ok=True)
        except ValueError as exc:
            raise ValueError(f"LABEL_STUDIO_URL={hide_url_secrets(settings.label_studio_url)!r}: {exc}") from None
        self.ls_origin, self.ls_auth = base.origin, base.auth
        self.ls_path = base.path.rstrip("/")  # e.g. /label-studio, or empty
        self.allowed = settings.allowed_host_list
        self.cache_dir = settings.image_cache_dir
        self._local = threading.local()

    # public API

    def fetch_bytes(self, url: str) -> bytes:
        """The image file's bytes (checked to decode as an image); ImageError otherwise."""
        return self._get(url)[0]

    def fetch(self, url: str) -> Image.Image:
        """The decoded RGB image; ImageError if it cannot be fetched or decoded."""
        return self._get(url)[1]

    def fetch_both(self, url: str) -> tuple[bytes, Image.Image]:
        """The file's bytes (for content hashing) and the decoded RGB image; ImageError otherwise."""
        return self._get(url)

    def fetch_content(self, url: str) -> bytes:
        """The file's bytes, for content hashing. From the disk cache without decoding them again (an
        entry is written only once its bytes decoded); fetched and checked to decode otherwise."""
        if not (isinstance(url, str) and url.strip().lower().startswith("data:")):
            cached = self._cache_read(self.resolve(url))
            if cached is not None:
                return cached
        return self._get(url)[0]

    def resolve(self, url: str) -> str:
        """The absolute URL fetched for a task's `url`, after checking it is allowed; ImageError if not."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(str(url), "empty or missing URL")
        url = url.strip()
        if url.startswith("//"):
            url = f"{self.ls_origin[0]}:{url}"
        elif url.startswith("/"):
            url = self.base_url + url  # keeps a path prefix such as http://host/label-studio
        return self._check_allowed(url).url

    # internals

    def _get(self, url: str) -> tuple[bytes, Image.Image]:
        if isinstance(url, str) and url.strip().lower().startswith("data:"):
            data = _data_uri_bytes(url.strip(), self.settings.max_image_bytes)
            return data, self._decode(data, url)
        url = self.resolve(url)
        cached = self._cache_read(url)
        if cached is not None:
            try:
                return cached, self._decode(cached, url)
            except ImageError:
                log.warning("discarding unreadable cache entry for %s", safe_url(url))
                self._cache_remove(url)
        data, content_type = self._download(url)
        try:
            image = self._decode(data, url)
        except ImageError as exc:
            hint = f"; server sent Content-Type {content_type}" if content_type and not content_type.startswith("image/") else ""
            raise ImageError(url, exc.reason + hint) from None
        self._cache_write(url, data)
        return data, image

    def _decode(self, data: bytes, url: str) -> Image.Image:
        return decode_image(data, max_pixels=self.settings.max_image_pixels, source=url,
                            max_side=self.settings.decode_max_side)

    def _check_allowed(self, url: str) -> _Target:
        """`url` parsed, if it may be fetched; ImageError naming the reason if not."""
        try:
            # user@ is allowed only as LABEL_STUDIO_URL's own, which relative task URLs inherit
            target = _Target(url, credentials_ok=self.ls_auth is not None and url.startswith(self.base_url + "/"))
        except ValueError as exc:
            raise ImageError(url, str(exc)) from None
        if target.origin[1:] == self.ls_origin[1:]:
            if self.auth_headers is not None:
                self._check_media_route(url, target)
            return target
        if not any(_host_matches(entry, target.host, target.port) for entry in self.allowed):
            shown = f"{target.host}:{target.port}" if target.port != _DEFAULT_PORTS[target.scheme] else target.host
            raise ImageError(url, f"host {shown!r} is not allowed (add it to PEAL_ALLOWED_HOSTS)")
        return target

    def _check_media_route(self, url: str, target: _Target) -> None:
        """The API token opens all of Label Studio's API: send it only to the routes that serve media."""
        if target.traverses:
            raise ImageError(url, "path has '.' or '..' segments or a percent-encoded '.', '/' or '\\'; "
                                  "refused on Label Studio, which gets the API token")
        route = target.path[len(self.ls_path):] if target.path.startswith(self.ls_path + "/") else ""
        if not _MEDIA_ROUTES.fullmatch(route):
            raise ImageError(url, f"path {target.path!r} is not one of Label Studio's media routes (/data/upload/, "
                                  "/data/local-files/, /tasks/<id>/resolve/, /projects/<id>/resolve/); "
                                  "the API token is sent only there")

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = "peal-backend"
        return session

    def _download(self, url: str) -> tuple[bytes, str]:
        timeout = self.settings.fetch_timeout
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        target = self._check_allowed(url)
        for hop in range(MAX_REDIRECTS + 1):
            url = target.url  # the URL requested is the one whose host was checked
            to_label_studio = target.origin == self.ls_origin
            headers = {}
            if self.auth_headers is not None and to_label_studio:
                headers.update(self.auth_headers())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(url, f"timed out after {timeout:g} s (PEAL_FETCH_TIMEOUT)")
            try:
                # One deadline covers all hops; each socket wait is also capped by what is left of it.
                response = self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                             timeout=(remaining, remaining))
            except requests.Timeout:
                raise ImageError(url, f"timed out after {timeout:g} s (PEAL_FETCH_TIMEOUT)") from None
            except requests.RequestException as exc:
                raise ImageError(url, f"request failed ({_scrub(str(exc), url)})") from None
            with response:
                if response.status_code in _REDIRECT_CODES:
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageError(url, f"HTTP {response.status_code} redirect without a Location")
                    if hop == MAX_REDIRECTS:
                        raise ImageError(url, f"more than {MAX_REDIRECTS} redirects")
                    try:
                        target = self._check_allowed(urljoin(url, location))
                    except ImageError as exc:
                        raise ImageError(url, f"redirected to {exc.url!r}: {exc.reason}") from None
                    continue
                if response.status_code != 200:
                    hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) \
                        and to_label_studio else ""
                    raise ImageError(url, f"HTTP {response.status_code} {response.reason or ''}".rstrip() + hint)
                data = self._read_body(url, response, deadline)
                log.debug("fetched %s: %d bytes in %.2f s", safe_url(url), len(data), time.monotonic() - started)
                return data, response.headers.get("Content-Type", "")
        raise AssertionError("unreachable")

    def _read_body(self, url: str, response: requests.Response, deadline: float) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageError(url, f"too large: {int(declared)} bytes > {limit} (PEAL_MAX_IMAGE_BYTES)")
        body = bytearray()
        try:
            for chunk in _chunks(response):
                body += chunk
                if len(body) > limit:
                    raise ImageError(url, f"too large: more than {limit} bytes (PEAL_MAX_IMAGE_BYTES)")
                if time.monotonic() > deadline:  # the read timeout is per read; this bounds the whole body
                    raise ImageError(url, f"timed out after {self.settings.fetch_timeout:g} s reading the body "
                                          "(PEAL_FETCH_TIMEOUT)")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # requests reports a read timeout inside iter_content as a ConnectionError
            if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in str(exc).lower():
                raise ImageError(url, f"timed out after {self.settings.fetch_timeout:g} s reading the body "
                                      "(PEAL_FETCH_TIMEOUT)") from None
            raise ImageError(url, f"download failed ({_scrub(str(exc), url)})") from None
        return bytes(body)

    # cache: by content. urls/<sha(url)> holds the content hash of what the URL gave; blobs/<hash> holds
    # the bytes once, however many URLs (?v=1, ?v=2, ...) point at it. Bounded by PEAL_IMAGE_CACHE_MB:
    # past it, the least recently used blobs go (a read touches its blob); a URL whose blob went is a miss.

    def _url_path(self, url: str) -> str:
        key = content_hash(url.encode("utf-8"))
        return os.path.join(self.cache_dir, "urls", key[:2], key)

    def _blob_path(self, digest: str) -> str:
        return os.path.join(self.cache_dir, "blobs", digest[:2], digest)

    def _cache_read(self, url: str) -> bytes | None:
        try:
            with open(self._url_path(url)) as f:
                digest = f.read().strip()
            blob = self._blob_path(digest)
            with open(blob, "rb") as f:
                data = f.read()
        except (OSError, ValueError):
            return None
        if content_hash(data) != digest:  # damaged on disk: a miss, and gone
            self._cache_remove(url)
            return None
        os.utime(blob)  # recently used
        return data

    def _atomic_write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the whole file or none
        except BaseException:
            os.unlink(tmp)
            raise

    def _cache_write(self, url: str, data: bytes) -> None:
        digest = content_hash(data)
        try:
            blob = self._blob_path(digest)
            if os.path.exists(blob):
                os.utime(blob)
            else:
                self._atomic_write(blob, data)
                self._account(len(data))
            self._atomic_write(self._url_path(url), digest.encode())
        except OSError as exc:  # a cache we cannot write only costs speed
            log.warning("cannot cache image %s: %s", safe_url(url), exc)

    @contextmanager
    def _size_ledger(self):
        """The blobs' total size, in a small file every process using the folder updates under a lock:
        checking the bound then costs one read per new image, and the folder is walked only to evict
        (a walk per few writes made filling a large pool quadratic). `None`: not known yet."""
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, ".size")
        with open(os.path.join(self.cache_dir, ".size.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path) as f:
                    ledger = {"bytes": int(f.read())}
            except (OSError, ValueError):  # first use, or a damaged ledger: the next walk measures
                ledger = {"bytes": None}
            yield ledger
            self._atomic_write(path, str(ledger["bytes"]).encode())

    def _account(self, added: int) -> None:
        with self._size_ledger() as ledger:
            if ledger["bytes"] is None or ledger["bytes"] + added > self.settings.image_cache_mb * 1e6:
                _, ledger["bytes"] = self._evict_lru()
            else:
                ledger["bytes"] += added

    def evict(self) -> int:
        """Delete least recently used blobs until the cache holds at most 90 % of PEAL_IMAGE_CACHE_MB
        (if it holds more than all of it); returns how many went. URL entries whose blob went stay
        behind as misses."""
        with self._size_ledger() as ledger:
            removed, ledger["bytes"] = self._evict_lru()
        return removed

    def _evict_lru(self) -> tuple[int, int]:
        """(blobs removed, bytes left): the folder walked, the oldest blobs deleted while over the bound."""
        limit = self.settings.image_cache_mb * 1e6
        blobs = []
        for root, _, files in os.walk(os.path.join(self.cache_dir, "blobs")):
            for name in files:
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                blobs.append((st.st_mtime, st.st_size, os.path.join(root, name)))
        total = sum(size for _, size, _ in blobs)
        if total <= limit:
            return 0, total
        removed = 0
        for _, size, path in sorted(blobs):
            if total <= 0.9 * limit:
                break
            try:
                os.unlink(path)
                total -= size
                removed += 1
            except OSError:
                pass
        log.info("image cache: evicted %d least recently used images (%.1f MB kept, limit %.0f MB)",
                 removed, total / 1e6, limit / 1e6)
        return removed, total

    def _cache_remove(self, url: str) -> None:
        """Forget a URL and the blob it points at (called for entries found unreadable)."""
        try:
            with open(self._url_path(url)) as f:
                os.unlink(self._blob_path(f.read().strip()))
        except (OSError, ValueError):
            pass
        try:
            os.unlink(self._url_path(url))
        except OSError:
            pass


def _chunks(response: requests.Response):
    """The body in pieces as they arrive (decoded, so a gzip body cannot expand past the byte limit).

    urllib3 2's read1 returns whatever has arrived; read(n) and iter_content wait for n bytes, which
    would let a server trickling bytes hold us far past the deadline.
    """
    raw = response.raw
    if hasattr(raw, "read1"):
        while chunk := raw.read1(_CHUNK, decode_content=True):
            yield chunk
    else:  # urllib3 1.x
        yield from response.iter_content(_CHUNK)


_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*;base64,", re.IGNORECASE)


def _data_uri_bytes(uri: str, limit: int) -> bytes:
    """Bytes of a `data:image/...;base64,` URI, within `limit`; ImageError otherwise."""
    match = _DATA_URI.match(uri)
    if not match or not match.group(1):
        raise ImageError(uri, "only data:image/...;base64, URIs are supported")
    payload = uri[match.end():]
    if len(payload) * 3 // 4 > limit:
        raise ImageError(uri, f"too large: more than {limit} bytes (PEAL_MAX_IMAGE_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(uri, "invalid base64 in data URI") from None


def _scrub(message: str, url: str) -> str:
    """An exception message with the URL's secrets removed: its credentials, and any query string in
    it (requests re-encodes the URL, so the query in the message need not match the one we sent)."""
    parts = urlsplit(url)
    for secret in (parts.username, parts.password):
        if secret:
            message = message.replace(secret, "***")
    return re.sub(r"\?[^\s'\")]+", "?***", message)
