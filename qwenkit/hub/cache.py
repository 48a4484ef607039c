"""The local model cache: one folder per model under ``$QWENKIT_HOME/models`` with a small JSON manifest.

Layout (root = QWENKIT_HOME, else $XDG_CACHE_HOME/qwenkit, else ~/.cache/qwenkit)::

    models/qwen2.5-coder--0.5b/manifest.json         complete model: the manifest is written last, in staging
    models/qwen2.5-coder--0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    models/Qwen--Qwen2.5-0.5B-Instruct/{config.json, model.safetensors, ...}
    models/<slug>.partial/                            a pull in progress (or killed): never listed, replaced next pull
    locks/<slug>.lock                                 one pull per model at a time

A pull fills ``<slug>.partial/`` and then renames it to ``<slug>/`` in one step, so a folder with a manifest is
always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MANIFEST = "manifest.json"
PARTIAL = ".partial"


def home() -> Path:
    """The cache root, read from the environment at call time."""
    if os.environ.get("QWENKIT_HOME"):
        return Path(os.environ["QWENKIT_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qwenkit"


def models_dir() -> Path:
    return home() / "models"


def slug(ref: str) -> str:
    """Folder name for a canonical reference (HF repo names never contain '--')."""
    return ref.replace("/", "--").replace(":", "--")


@dataclass(frozen=True)
class CachedFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CachedModel:
    """A complete cached model. `path` is what loaders take: the .gguf file (first shard) or the folder."""

    ref: str
    folder: Path
    path: Path
    source: str  # "hub" | "mirror"
    repo: str
    revision: str | None
    files: tuple[CachedFile, ...]
    pulled_at: str
    aliases: tuple[str, ...] = ()  # other references pulled into this copy (``repo``, ``repo:Q4_K_M``)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def is_complete(self) -> bool:
        """Cheap check: every file is there with its recorded size (no hashing)."""
        for f in self.files:
            try:
                if (self.folder / f.name).stat().st_size != f.size:
                    return False
            except OSError:
                return False
        return True


def read(folder: Path) -> CachedModel | None:
    """The model in a cache folder, or None when it has no readable manifest."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = tuple(CachedFile(f["name"], int(f["size"]), f["sha256"]) for f in data["files"])
        main = data.get("path") or ""
        return CachedModel(
            ref=data["ref"],
            folder=folder,
            path=folder / main if main else folder,
            source=data["source"],
            repo=data.get("repo", ""),
            revision=data.get("revision"),
            files=files,
            pulled_at=data.get("pulled_at", ""),
            aliases=tuple(data.get("aliases", ())),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_models() -> list[CachedModel]:
    """Every complete model in the cache, sorted by reference."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = (read(p) for p in root.iterdir() if p.is_dir() and not p.name.endswith(PARTIAL))
    return sorted((m for m in found if m is not None), key=lambda m: m.ref)


def get(ref: str) -> CachedModel | None:
    """The cached model stored under this canonical reference, if any."""
    model = read(models_dir() / slug(ref))
    return model if model is not None and model.ref == ref else None


def cached_path(ref: str) -> Path | None:
    """The file or folder of a cached model (canonical reference), or None."""
    model = get(ref)
    return model.path if model is not None else None


def remove(ref: str) -> Path:
    """Delete a cached model (and any unfinished pull of it); returns the folder removed.

    Raises FileNotFoundError when neither exists (the package-level remove() maps it to ModelNotFound).
    """
    folder = models_dir() / slug(ref)
    staging = staging_path(ref)
    if not folder.exists() and not staging.exists():
        raise FileNotFoundError(folder)
    for p in (folder, staging):
        if p.exists():
            shutil.rmtree(p)
    return folder


def staging_path(ref: str) -> Path:
    return models_dir() / (slug(ref) + PARTIAL)


def new_staging(ref: str) -> Path:
    """An empty staging folder for a pull, replacing what a killed pull left behind."""
    staging = staging_path(ref)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def lock(ref: str):
    """An inter-process lock held while a model is pulled (kept outside models/ so it is never listed)."""
    from filelock import FileLock  # a dependency of huggingface_hub

    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / (slug(ref) + ".lock")))


def _manifest(model_ref: str, *, source, repo, revision, path, files, aliases, pulled_at=None) -> str:
    manifest = {
        "ref": model_ref,
        "source": source,
        "repo": repo,
        "revision": revision,
        "path": path,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files],
        "aliases": sorted(set(aliases) - {model_ref}),
        "pulled_at": pulled_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(manifest, indent=2) + "\n"


def commit(
    staging: Path,
    *,
    ref: str,
    source: str,
    repo: str,
    revision: str | None,
    path: str,
    files: list[CachedFile],
    aliases: tuple[str, ...] = (),
) -> CachedModel:
    """Write the manifest into a filled staging folder and move it into place in one rename."""
    final = models_dir() / slug(ref)
    old = read(final)
    aliases = tuple(aliases) + (old.aliases if old is not None else ())
    text = _manifest(ref, source=source, repo=repo, revision=revision, path=path, files=files, aliases=aliases)
    (staging / MANIFEST).write_text(text)
    if final.exists():  # a stale or damaged copy: the new pull wins
        shutil.rmtree(final)
    os.replace(staging, final)
    model = read(final)
    assert model is not None
    return model


def add_alias(model: CachedModel, alias: str) -> CachedModel:
    """Record another reference for a cached model (manifest rewritten atomically)."""
    if alias == model.ref or alias in model.aliases:
        return model
    text = _manifest(
        model.ref, source=model.source, repo=model.repo, revision=model.revision,
        path=str(model.path.relative_to(model.folder)) if model.path != model.folder else "",
        files=model.files, aliases=model.aliases + (alias,), pulled_at=model.pulled_at,
    )
    tmp = model.folder / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, model.folder / MANIFEST)
    return read(model.folder) or model
