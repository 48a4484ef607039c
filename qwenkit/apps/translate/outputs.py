"""Where captions go: the terminal, SRT and JSONL files. (The heads-up web page is web.py.)

Every sink takes Caption events through `add` and is closed once at the end. File sinks write each final caption as
soon as it exists and flush it, so a session killed halfway keeps what it already captioned.
"""

from __future__ import annotations

import json
import shutil
import sys
import unicodedata
from pathlib import Path
from typing import IO, Protocol

from qwenkit.apps.translate.captioner import Caption
from qwenkit.errors import QwenkitError


class Sink(Protocol):
    def add(self, caption: Caption) -> None: ...

    def close(self) -> None: ...


def srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _open(path: str | Path) -> IO[str]:
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise QwenkitError(f"{path}: cannot write ({e.strerror or e})") from None


class SrtWriter:
    """SubRip: one numbered cue per final caption, the translation with the source line under it."""

    def __init__(self, path: str | Path, *, with_source: bool = True):
        self.file = _open(path)
        self.with_source = with_source
        self.count = 0

    def add(self, caption: Caption) -> None:
        if not caption.final or not (caption.text or caption.source):
            return
        self.count += 1
        end = max(caption.end, caption.start + 0.5)  # a cue needs time on screen
        lines = [caption.text or caption.source]
        if self.with_source and caption.text and caption.source:
            lines.append(caption.source)
        self.file.write(f"{self.count}\n{srt_time(caption.start)} --> {srt_time(end)}\n" + "\n".join(lines) + "\n\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class JsonlWriter:
    """One JSON object a line per final caption (and per partial update with partials=True)."""

    def __init__(self, path: str | Path, *, partials: bool = False):
        self.file = _open(path)
        self.partials = partials

    def add(self, caption: Caption) -> None:
        if caption.final or self.partials:
            self.file.write(json.dumps(caption.to_dict(), ensure_ascii=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TerminalView:
    """On a terminal: the caption being spoken is redrawn in place (source dimmed, fixed words bright, the rest
    grey), and scrolls up once final. Elsewhere (a pipe, a file): one line per final caption, the translation."""

    def __init__(self, out: IO[str] | None = None, *, show_source: bool = True):
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.show_source = show_source
        self.drawn = 0  # lines of the partial caption now on screen

    def add(self, caption: Caption) -> None:
        if not self.tty:
            if caption.final and (caption.text or caption.source):
                print(caption.text or caption.source, file=self.out, flush=True)
            return
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        self._erase()
        if caption.final:
            if caption.text or caption.source:
                if self.show_source and caption.text:
                    self.out.write(f"\x1b[2m{_fit(caption.source, width)}\x1b[0m\n")
                self.out.write(f"\x1b[1m{_fit(caption.text or caption.source, width)}\x1b[0m\n")
        else:
            lines = []
            if self.show_source:
                lines.append(f"\x1b[2m{_fit(caption.source, width)}\x1b[0m")
            fixed = caption.text_fixed if caption.text.startswith(caption.text_fixed) else ""
            lines.append(_fit_styled(fixed, caption.text[len(fixed):], width))
            self.out.write("\n".join(lines) + "\n")
            self.drawn = len(lines)
        self.out.flush()

    def _erase(self) -> None:
        if self.drawn:
            self.out.write("\x1b[1A\x1b[2K" * self.drawn + "\r")
            self.drawn = 0

    def close(self) -> None:
        if self.tty:
            self._erase()
            self.out.flush()


def _columns(text: str) -> int:
    """Terminal columns: CJK characters take two, so a Chinese line measured by len() would wrap."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _cut(text: str, width: int) -> int:
    """How many leading characters to drop so that "…" and the rest fit in `width` columns (0 if it all fits)."""
    if _columns(text) <= width:
        return 0
    kept = 0
    for i in range(len(text) - 1, -1, -1):
        kept += _columns(text[i])
        if kept > width - 1:
            return i + 1
    return 0


def _fit(text: str, width: int) -> str:
    """The end of a long line: a caption shows what was said last."""
    drop = _cut(text, width)
    return "…" + text[drop:] if drop else text


def _fit_styled(fixed: str, rest: str, width: int) -> str:
    """`fixed` bright and `rest` grey, cut from the left like _fit."""
    drop = _cut(fixed + rest, width)
    lead = "…" if drop else ""
    return f"{lead}\x1b[1m{fixed[drop:]}\x1b[0m\x1b[90m{rest[max(0, drop - len(fixed)):]}\x1b[0m"
