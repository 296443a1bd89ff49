"""What a client sends: a JSON body; media as data URLs, http(s) URLs where the operator allows them, JPEG/PNG
bodies. Sizes are checked before anything is decoded; nothing here reads a local path.

An image's header is read when the request arrives (format and pixel count, the
decompression-bomb check) and its pixels only when the model needs them, so a queued
request holds compressed bytes. URLs are fetched only with --allow-urls, and then only from
hosts whose every address is public unless --allow-private-urls: the host is resolved and
each address checked, again at every redirect.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from m4.errors import M4Error
from m4.media import load_image, sample_uniform
from m4.serve.errors import ApiError

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP"]  # what PIL may decode for a client
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # a body, and a fetched image or video
    max_pixels: int  # an image's or a video frame's width x height
    allow_urls: bool = False
    allow_private_urls: bool = False
    video_frames: int = 8  # frames sampled from a video_url


def parse_json(data: bytes):
    """A request body's JSON. Python's parser recurses per nesting level, so a body of
    arrays nested 100,000 deep (well under the size limit) overflows the stack: refused as
    bad JSON, like any other, and the server goes on."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: it nests too deep", "invalid_json") from None


def open_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """The image's header read and checked; its pixels are decoded later by `decode`."""
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise too_many_pixels(what, None, limits) from None
    except Exception:  # PIL raises UnidentifiedImageError, and others on broken headers
        raise ApiError(400, f"cannot decode {what}: not a JPEG, PNG, WebP, GIF or BMP image",
                       "invalid_image") from None
    if img.width * img.height > limits.max_pixels:
        raise too_many_pixels(what, img.size, limits)
    return img


def too_many_pixels(what: str, size, limits: Limits) -> ApiError:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return ApiError(400, f"{what}{dims} is over the pixel limit of {limits.max_pixels} "
                    "(m4 serve --max-pixels)", "image_too_large")


def decode(img: Image.Image, what: str = "image") -> Image.Image:
    """Pixels of an image `open_image` checked, as RGB."""
    try:
        img.load()
        return load_image(img)
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ...
        raise ApiError(400, f"cannot decode {what}: {' '.join(str(e).split()) or type(e).__name__}",
                       "invalid_image") from None


def fetch_bytes(url: str, limits: Limits, what: str) -> bytes:
    """A data URL's bytes, or an http(s) URL's where allowed. Blocking: run it off the event loop."""
    if url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise ApiError(400, f"{what}: a data URL must be base64 (data:<type>;base64,...)", "invalid_url")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise ApiError(400, f"{what}: the data URL is not valid base64", "invalid_base64") from None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ApiError(400, f"{what}: only data: URLs and http(s) URLs are read, not {scheme or 'a bare path'}",
                       "invalid_url")
    if not limits.allow_urls:
        raise ApiError(400, f"{what}: this server does not fetch URLs (m4 serve --allow-urls); send a data: URL",
                       "url_not_allowed")
    return _get(url, limits, what)


def check_host(url: str, allow_private: bool, what: str) -> None:
    """Every address the URL's host resolves to must be public, unless private ones are allowed."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ApiError(400, f"{what}: no host in the URL", "invalid_url")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ApiError(400, f"{what}: cannot resolve {parts.hostname}", "invalid_url") from None
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        addr = getattr(addr, "ipv4_mapped", None) or addr
        if not addr.is_global or addr.is_multicast:
            raise ApiError(400, f"{what}: {parts.hostname} resolves to {addr}, a loopback, private or reserved "
                           "address, which this server does not fetch (m4 serve --allow-private-urls)",
                           "url_not_allowed")


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool, what: str):
        self.allow_private, self.what, self.count = allow_private, what, 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.count += 1
        if self.count > MAX_REDIRECTS:
            raise ApiError(400, f"{self.what}: more than {MAX_REDIRECTS} redirects", "invalid_url")
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise ApiError(400, f"{self.what}: redirected to a non-http URL", "invalid_url")
        check_host(newurl, self.allow_private, self.what)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _get(url: str, limits: Limits, what: str) -> bytes:
    check_host(url, limits.allow_private_urls, what)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         _Redirects(limits.allow_private_urls, what))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "m4"}), timeout=FETCH_TIMEOUT_S) as r:
            data = r.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"{what}: cannot fetch {url}: {getattr(e, 'reason', e)}", "fetch_failed") from None
    if len(data) > limits.max_bytes:
        raise ApiError(413, f"{what}: over the size limit of {limits.max_bytes} bytes", "too_large")
    return data


def video_frames(data: bytes, limits: Limits, what: str = "video") -> list[np.ndarray]:
    """A video file's bytes -> `limits.video_frames` frames sampled over its length, as
    `m4.load(...).ask(video=path)` samples a file. Blocking: run it off the event loop."""
    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        try:
            with av.open(f.name) as c:
                s = c.streams.video[0] if c.streams.video else None
                if s is not None and (s.codec_context.width or 0) * (s.codec_context.height or 0) > limits.max_pixels:
                    raise too_many_pixels(what, (s.codec_context.width, s.codec_context.height), limits)
        except av.FFmpegError:
            raise ApiError(400, f"cannot decode {what}: not a video file", "invalid_video") from None
        try:
            return [fr.image for fr in sample_uniform(f.name, limits.video_frames)]
        except M4Error as e:
            raise ApiError(400, str(e).replace(f.name, what), "invalid_video") from None
