"""Read a GGUF file's metadata into the plain `meta` dict qwenkit's text code takes, with llama.cpp's gguf package.

GGUFReader parses the whole header (about 15 s for the 0.5B model on two cores), so results are cached per path.
"""

from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=4)
def _read(path: str) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf_meta(path: str | Path) -> dict[str, Any]:
    """{key: value} for every metadata key (strings as str, arrays as lists); a fresh dict per call."""
    return dict(_read(str(Path(path).resolve())))
