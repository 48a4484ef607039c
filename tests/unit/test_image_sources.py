"""Where image bytes come from (qwenkit.media.sources): data: URLs, local files and http(s) URLs, each under the
caller's policy, with size and time limits; a real HTTP server on loopback stands in for a web host."""

from __future__ import annotations

import base64
import http.server
import time
from pathlib import Path

import pytest

from qwenkit.errors import BadImage
from qwenkit.media.sources import SourcePolicy, data_url, read_source
from tests.fakes.loopback import serving

PHOTO = Path(__file__).parents[1] / "fixtures" / "images" / "coffee_wide.webp"


class _Host(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/slow.webp":
            time.sleep(2)
        if self.path not in ("/photo.webp", "/slow.webp"):
            self.send_error(404)
            return
        data = PHOTO.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/webp")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_data_url_round_trip():
    url = data_url(PHOTO, str(PHOTO), SourcePolicy())
    assert url.startswith("data:image/webp;base64,")
    assert read_source(url, "image 1", SourcePolicy.server(False)) == PHOTO.read_bytes()


def test_http_fetch_under_the_policy():
    with serving(_Host) as base:
        assert read_source(f"{base}/photo.webp", "image 1", SourcePolicy.server(True)) == PHOTO.read_bytes()
        with pytest.raises(BadImage, match=r"^image 1: http\(s\) image URLs are not accepted here.*--allow-image"):
            read_source(f"{base}/photo.webp", "image 1", SourcePolicy.server(False))
        with pytest.raises(BadImage, match=r"gave HTTP 404"):
            read_source(f"{base}/missing.webp", "image 1", SourcePolicy())
        small = SourcePolicy(max_bytes=1000)
        with pytest.raises(BadImage, match=r"over the limit of 1000 bytes"):
            read_source(f"{base}/photo.webp", "image 1", small)
        with pytest.raises(BadImage, match=r"took longer than 0.5 s"):
            read_source(f"{base}/slow.webp", "image 1", SourcePolicy(timeout=0.5))


def test_files_and_their_limits(tmp_path):
    assert read_source(str(PHOTO), str(PHOTO), SourcePolicy()) == PHOTO.read_bytes()
    assert read_source(PHOTO.as_uri(), "image 1", SourcePolicy()) == PHOTO.read_bytes()
    with pytest.raises(BadImage, match=r"local files are not accepted here"):
        read_source(str(PHOTO), "image 1", SourcePolicy.server(True))
    with pytest.raises(BadImage, match=r"^/no/such\.jpg: no such file$"):
        read_source("/no/such.jpg", "/no/such.jpg", SourcePolicy())
    with pytest.raises(BadImage, match=r"a folder, not an image"):
        read_source(str(tmp_path), str(tmp_path), SourcePolicy())
    with pytest.raises(BadImage, match=r"over the limit of 1000"):
        read_source(str(PHOTO), str(PHOTO), SourcePolicy(max_bytes=1000))


@pytest.mark.parametrize("url, message", [
    ("data:image/png,raw", "data:<type>;base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"x" * 3000).decode(), "over the limit of 1000 bytes"),
    ("ftp://host/cat.jpg", "unsupported image URL scheme 'ftp'"),
])
def test_bad_urls(url, message):
    with pytest.raises(BadImage, match=message):
        read_source(url, "image 1", SourcePolicy(max_bytes=1000))
