"""Downloads from the Hugging Face hub through huggingface_hub, each file verified by sha256.

HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read from the environment at call time (huggingface_hub reads some of
them once, at import). Every file is checked against its pinned sha256, else the hub's LFS sha256 (the ETag of an
LFS file), else the git blob id of a small file; a mismatch deletes the file and raises ChecksumMismatch.

Errors: HubUnreachable (a DownloadError: DNS, refused, timeout, offline mode, 5xx) lets the caller fall back to a
mirror; a missing repo, revision or file is ModelNotFound; anything else from the hub is DownloadError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qwenkit.errors import BadCheckpoint, ChecksumMismatch, DownloadError, ModelNotFound
from qwenkit.hub.registry import FileSpec, ModelEntry, quant_matches, shard_names

log = logging.getLogger("qwenkit.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
# Small files of a transformers folder fetched when present (config.json is required).
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",  # vision-language releases keep their template here
    "preprocessor_config.json",  # how a vision-language model cuts images into patches
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class HubUnreachable(DownloadError):
    """The hub could not be reached at all (DNS, connection refused, timeout, HF_HUB_OFFLINE, server error)."""


@dataclass(frozen=True)
class Downloaded:
    """What a hub download put in its destination folder."""

    revision: str | None
    files: list[tuple[str, int, str]]  # (name, size, sha256), in download order
    main: str  # the model path relative to the folder: the first .gguf, or "" for a transformers folder


@dataclass(frozen=True)
class Plan:
    """The files a pull will fetch, known before any download (a listing call when the entry names no files)."""

    revision: str
    files: tuple[FileSpec, ...]
    folder: bool  # a transformers folder (files may grow by the shards of a safetensors index)

    @property
    def main(self) -> str:
        return "" if self.folder else self.files[0].name


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def progress_enabled(progress: bool) -> bool:
    try:
        return bool(progress) and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar_class(enabled: bool):
    """A tqdm class for huggingface_hub's bars: on stderr, shown only when `enabled`."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = not enabled
            if isinstance(kwargs.get("desc"), str):  # huggingface_hub passes a truncated URL: show the file name
                kwargs["desc"] = kwargs["desc"].rsplit("/", 1)[-1]
            kwargs.setdefault("file", sys.stderr)
            super().__init__(*args, **kwargs)

    return Bar


def hash_file(path: Path, *, git_blob: bool = False) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None) of a file, in one read."""
    sha = hashlib.sha256()
    git = None
    if git_blob:
        git = hashlib.sha1()
        git.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
    return sha.hexdigest(), (git.hexdigest() if git is not None else None)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level errors of whichever HTTP library this huggingface_hub uses (httpx2, httpx or requests)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)
        errors += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(errors)


@contextmanager
def _hub_errors(what: str):
    """Map huggingface_hub and network errors to ours."""
    from huggingface_hub import errors as hf

    entry_not_found = getattr(hf, "RemoteEntryNotFoundError", None) or hf.EntryNotFoundError
    try:
        yield
    except hf.GatedRepoError as e:
        raise DownloadError(f"{what} is gated: accept its licence on the hub and set HF_TOKEN") from e
    except hf.RepositoryNotFoundError as e:
        raise ModelNotFound(f"{what}: no such repository on {endpoint()} (private repos need HF_TOKEN)") from e
    except (hf.RevisionNotFoundError, entry_not_found) as e:
        raise ModelNotFound(f"{what}: not found on {endpoint()}") from e
    except hf.HfHubHTTPError as e:
        status = _status(e)
        if status == 404:
            raise ModelNotFound(f"{what}: not found on {endpoint()} (HTTP 404)") from e
        if status is not None and status >= 500:
            raise HubUnreachable(f"{endpoint()} answered HTTP {status} for {what}") from e
        raise DownloadError(f"{what}: HTTP {status} from {endpoint()}") from e
    except hf.LocalEntryNotFoundError as e:
        # hf_hub_download's own HEAD failed: look at why.
        cause = e.__cause__
        if isinstance(cause, hf.HfHubHTTPError) and _status(cause) == 404:
            raise ModelNotFound(f"{what}: not found on {endpoint()} (HTTP 404)") from e
        raise HubUnreachable(f"cannot reach {endpoint()} for {what}: {cause or e}") from e
    except _transport_errors() as e:
        raise HubUnreachable(f"cannot reach {endpoint()}: {e or type(e).__name__}") from e
    except OSError as e:  # e.g. huggingface_hub's size consistency check after a cut-off transfer
        raise DownloadError(f"{what}: {e}") from e


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token())


def _list(repo: str, revision: str) -> tuple[str | None, list[str]]:
    with _hub_errors(repo):
        info = _api().model_info(repo, revision=revision)
    return info.sha, [s.rfilename for s in (info.siblings or [])]


_QUANT_LABEL = re.compile(r"[-_.]((?:I?Q\d\w*|BF16|F16|F32))(?:-\d{5}-of-\d{5})?\.gguf$", re.IGNORECASE)


def _choose_gguf(repo: str, names: list[str], quant: str | None) -> list[str]:
    """The file(s) of one quant: the one asked for, else Q4_K_M, else the repo's only quant."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and "/" not in n)
    labels = sorted({m.group(1).upper() for n in ggufs if (m := _QUANT_LABEL.search(n))})
    if quant is None:
        quant = "Q4_K_M" if "Q4_K_M" in labels or len(labels) != 1 else labels[0]
    hits = [n for n in ggufs if quant_matches(n, quant)]
    if hits:
        return shard_names(hits[0])
    raise ModelNotFound(f"{repo}:{quant}: no such GGUF file; this repo has: {', '.join(labels) or 'no .gguf files'}")


def plan(entry: ModelEntry) -> Plan:
    """Which files to fetch: the entry's own, or from the repo listing (a transformers folder or one GGUF quant)."""
    if offline():
        raise HubUnreachable("HF_HUB_OFFLINE is set")
    if entry.files:
        return Plan(entry.revision, entry.files, folder=entry.folder)
    revision, names = _list(entry.repo, entry.revision)
    top = [n for n in names if "/" not in n]
    if entry.quant is None and (SAFETENSORS_INDEX in top or any(n.endswith(".safetensors") for n in top)):
        if "config.json" not in top:
            raise ModelNotFound(f"{entry.repo} has safetensors but no config.json: not a transformers model")
        specs = [FileSpec(n) for n in FOLDER_FILES if n in top]
        if SAFETENSORS_INDEX in top:
            specs.append(FileSpec(SAFETENSORS_INDEX))  # its shards are added once it is downloaded
        else:
            specs += [FileSpec(n) for n in sorted(top) if n.endswith(".safetensors")]
        return Plan(revision or entry.revision, tuple(specs), folder=True)
    if entry.quant is not None or any(n.lower().endswith(".gguf") for n in top):
        files = tuple(FileSpec(n) for n in _choose_gguf(entry.repo, names, entry.quant))
        return Plan(revision or entry.revision, files, folder=False)
    raise ModelNotFound(f"{entry.repo} has neither *.safetensors nor *.gguf weights")


def fetch(entry: ModelEntry, dest: Path, *, progress: bool = True, planned: Plan | None = None) -> Downloaded:
    """Download a model's files from the hub into `dest` (a staging folder), each verified."""
    p = planned or plan(entry)
    bar = bar_class(progress_enabled(progress))
    specs = list(p.files)
    revision = p.revision
    records: list[tuple[str, int, str]] = []
    i = 0
    while i < len(specs):
        spec = specs[i]
        revision, record = _fetch_file(entry.repo, spec, revision, dest, bar)
        records.append(record)
        if p.folder and spec.name == SAFETENSORS_INDEX:
            have = {x.name for x in specs}
            specs += [FileSpec(s) for s in _index_shards(dest / SAFETENSORS_INDEX) if s not in have]
        i += 1
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
    return Downloaded(revision=revision, files=records, main=p.main)


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadCheckpoint(f"{index.name}: unreadable safetensors index ({e})") from e


def _fetch_file(repo: str, spec: FileSpec, revision: str, dest: Path, bar) -> tuple[str, tuple[str, int, str]]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    ep, tok = endpoint(), token()
    what = f"{repo}/{spec.name}"
    with _hub_errors(what):  # one fast HEAD first: no retries, so an unreachable hub is known at once
        meta = get_hf_file_metadata(hf_hub_url(repo, spec.name, revision=revision, endpoint=ep), token=tok, endpoint=ep)
    etag = (meta.etag or "").lower()
    if spec.sha256 and _SHA256.match(etag) and etag != spec.sha256:
        raise ChecksumMismatch(
            f"{spec.name}: the hub serves sha256 {etag} but qwenkit pins {spec.sha256}; refusing to download it"
        )
    commit = meta.commit_hash or revision
    log.info("downloading %s (%s bytes) from %s", what, meta.size, ep)
    with _hub_errors(what):
        local = Path(
            hf_hub_download(repo, spec.name, revision=commit, local_dir=dest, endpoint=ep, token=tok, tqdm_class=bar)
        )
    expected = spec.sha256 or (etag if _SHA256.match(etag) else None)
    git_expected = etag if expected is None and _GIT_SHA1.match(etag) else None
    actual, git_actual = hash_file(local, git_blob=git_expected is not None)
    size = local.stat().st_size
    if expected is not None and actual != expected:
        local.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{spec.name}: sha256 mismatch: expected {expected}, got {actual} (file removed)")
    if git_expected is not None and git_actual != git_expected:
        local.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{spec.name}: git blob id mismatch: expected {git_expected}, got {git_actual} (file removed)"
        )
    if spec.size is not None and size != spec.size:
        local.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{spec.name}: size mismatch: expected {spec.size} bytes, got {size} (file removed)")
    if expected is None and git_expected is None:
        log.warning("%s: the hub gave no checksum (ETag %r); recorded sha256 %s unverified", what, meta.etag, actual)
    return commit, (spec.name, size, actual)
