"""Where an image's bytes come from: a data: URL, a local file, or (where allowed) an http(s) URL.

The server takes data URLs only unless started with --allow-image-urls: fetching any URL a client names would let
clients make the server reach hosts it can see and they cannot. Local files are for the CLI and the Python API, whose
caller already owns the machine. Every source is capped in size, and a fetch in time.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from qwenkit.errors import BadImage

MAX_IMAGE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class SourcePolicy:
    """Which image sources a caller may name."""

    files: bool = True  # local paths and file:// URLs
    http: bool = True  # http(s) URLs, fetched with the limits below
    max_bytes: int = MAX_IMAGE_BYTES
    timeout: float = 10.0

    @classmethod
    def server(cls, allow_urls: bool) -> SourcePolicy:
        return cls(files=False, http=allow_urls)


def data_url(path: Path, where: str, policy: SourcePolicy) -> str:
    """A local image as a data: URL, which any backend (a server, a router, this process) accepts."""
    data = _file(path, where, policy.max_bytes)
    fmt = sniff_format(data)
    media = f"image/{fmt.lower()}" if fmt in ("JPEG", "PNG", "WEBP") else "application/octet-stream"
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def sniff_format(data: bytes) -> str | None:
    """The image format named by the bytes' magic (Pillow's names: JPEG, PNG, WEBP, GIF...), or None. The loader
    (qwenkit.media.image) picks the decoder by it, so that Pillow never runs the header parser of a format we do not
    accept, and so that a GIF or HEIC gets a message naming it."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "HEIC"
    if data[:2] == b"BM":
        return "BMP"
    return None


def read_source(url: str, where: str, policy: SourcePolicy) -> bytes:
    """The bytes of the image at `url`; BadImage naming `where` for a source refused, missing or too big."""
    if url.startswith("data:"):
        return _data_url(url, where, policy.max_bytes)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.http:
            raise BadImage(f"{where}: http(s) image URLs are not accepted here (send the image as a data: URL, or "
                           "start the server with --allow-image-urls)")
        return _fetch(url, where, policy)
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # C:\ on Windows
        if not policy.files:
            raise BadImage(f"{where}: local files are not accepted here (send the image as a data: URL)")
        return _file(Path(unquote(urlparse(url).path) if scheme == "file" else url), where, policy.max_bytes)
    raise BadImage(f"{where}: unsupported image URL scheme {scheme!r} (data:, http(s): or a file)")


def _data_url(url: str, where: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise BadImage(f"{where}: a data URL must be data:<type>;base64,<data>")
    if len(payload) * 3 // 4 > max_bytes:
        raise BadImage(f"{where}: the image is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{where}: the data URL is not valid base64") from None


def _file(path: Path, where: str, max_bytes: int) -> bytes:
    """`where` names the file in messages (its path, as the caller gave it)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadImage(f"{where}: {size} bytes is over the limit of {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"{where}: no such file") from None
    except IsADirectoryError:
        raise BadImage(f"{where}: a folder, not an image") from None
    except OSError as e:
        raise BadImage(f"{where}: cannot read it ({e.strerror or e})") from None


def _fetch(url: str, where: str, policy: SourcePolicy) -> bytes:
    import httpx2 as httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise BadImage(f"{where}: fetching {url} gave HTTP {response.status_code}")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > policy.max_bytes:
                    raise BadImage(f"{where}: {url} is over the limit of {policy.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise BadImage(f"{where}: fetching {url} took longer than {policy.timeout:g} s") from None
    except httpx.HTTPError as e:
        raise BadImage(f"{where}: cannot fetch {url} ({type(e).__name__})") from None
