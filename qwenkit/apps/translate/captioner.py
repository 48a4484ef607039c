"""Live captions: audio in, utterances (VAD), source text (Whisper), target text (Qwen), as Caption events.

Two ways to run, chosen by the source:

- `live=True` (a microphone, PCM on stdin, a file played in real time): a reader thread takes audio as it comes;
  one worker does the compute, most urgent first: (1) an utterance that ended gets its final caption; (2) while
  someone speaks, the utterance so far is transcribed again every `partial_every` seconds of new audio, and as
  soon as a pause starts (before the VAD is sure the utterance is over) it is transcribed up to that pause, the
  span the final caption will use; (3) a changed transcript is translated. Captions of (2) and (3) are partial:
  the parts that two consecutive hypotheses agree on are fixed (agreement.py) and later decodes must start with
  them, so the text on screen only grows. When the pause turns out to be the end, the final caption reuses the
  transcript and translation already made of that same span, so it comes out at once instead of after both.
- `live=False` (a file as fast as it decodes): each utterance is captioned once, when it ends, in order. The
  output depends only on the audio, so a file always gives the same captions.

Only one model runs at a time, so Whisper and Qwen never fight over the two cores. If translation fails (every
backend of a route down), the caption carries its transcript alone and the session goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from qwenkit.apps.translate.agreement import common_text, common_tokens
from qwenkit.apps.translate.asr import Hypothesis, WhisperASR
from qwenkit.apps.translate.audio import SAMPLE_RATE
from qwenkit.apps.translate.translator import TranslationError, Translator
from qwenkit.apps.translate.vad import SpeechDetector, Utterance, VadOptions

log = logging.getLogger("qwenkit.translate")


@dataclass
class Caption:
    """One caption update. Times are seconds of the audio stream; `latency` (final captions of a live source) is
    wall seconds from the moment the end of the speech arrived to this caption."""

    index: int
    start: float
    end: float
    source: str
    text: str
    final: bool
    source_fixed: str = ""  # partials: the part that will not change any more
    text_fixed: str = ""
    latency: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Stats:
    audio_seconds: float = 0.0
    asr_seconds: float = 0.0
    mt_seconds: float = 0.0
    asr_calls: int = 0
    mt_calls: int = 0
    mt_errors: int = 0  # translations that failed (the caption kept its transcript)
    fallbacks: int = 0  # hypotheses decoded again on Whisper's full window
    reused: int = 0  # final captions whose transcript and translation were ready when the utterance ended
    wall_seconds: float = 0.0

    @property
    def busy_seconds(self) -> float:
        return self.asr_seconds + self.mt_seconds

    @property
    def rtf(self) -> float:
        """Compute time per second of audio: under 1.0, the captioner keeps up."""
        return self.busy_seconds / self.audio_seconds if self.audio_seconds else 0.0


@dataclass
class _Active:
    """The utterance being spoken (or just ended), with its hypotheses so far."""

    index: int
    start: int  # sample where the VAD heard speech begin
    fixed_tokens: list[int] = field(default_factory=list)
    tokens: list[int] | None = None  # latest transcript
    source: str = ""
    heard_to: int = -1  # the latest transcript covers audio up to this sample
    fixed_text: str = ""
    translated: str | None = None  # the source text the latest translation is of
    text: str = ""


class _Audio:
    """The stream's recent samples, addressable by absolute sample number."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.first = 0  # absolute index of chunks[0][0]
        self.end = 0  # absolute index one past the last sample
        self.arrivals: deque[tuple[int, float]] = deque()  # (end sample of a chunk, wall time it arrived)

    def append(self, chunk: np.ndarray, arrived: float) -> None:
        self.chunks.append(chunk)
        self.end += chunk.size
        self.arrivals.append((self.end, arrived))

    def span(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.first), min(b, self.end)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        out, pos = [], self.first
        for c in self.chunks:
            lo, hi = max(a, pos), min(b, pos + c.size)
            if lo < hi:
                out.append(c[lo - pos:hi - pos])
            pos += c.size
            if pos >= b:
                break
        return np.concatenate(out)

    def arrived(self, sample: int) -> float | None:
        """Wall time when `sample` had arrived (the arrival of the chunk that holds it)."""
        for end, t in self.arrivals:
            if end > sample:
                return t
        return self.arrivals[-1][1] if self.arrivals else None

    def forget_before(self, sample: int) -> None:
        while self.chunks and self.first + self.chunks[0].size <= sample:
            self.first += self.chunks.popleft().size
        while len(self.arrivals) > 1 and self.arrivals[0][0] <= sample:
            self.arrivals.popleft()


class Captioner:
    def __init__(self, asr: WhisperASR, translator: Translator | None, *, vad: VadOptions | None = None,
                 partials: bool = True, partial_every: float = 1.0, script: str = "simplified"):
        self.asr, self.translator = asr, translator
        self.vad_options = vad or VadOptions()
        self.partials, self.partial_every = partials, partial_every
        self.convert = _script_converter(asr.language, script)
        self.stats = Stats()

    # ---- entry point ----------------------------------------------------------------------------------------------
    def captions(self, chunks: Iterable[np.ndarray], *, live: bool = False) -> Iterator[Caption]:
        """Caption events for a stream of 16 kHz mono chunks; final captions come in order, one per utterance."""
        self.stats = Stats()
        self.vad = SpeechDetector(self.vad_options)
        self.audio = _Audio()
        self.pad = int(self.vad_options.pad * SAMPLE_RATE)
        self.count = 0
        self.active: _Active | None = None
        self.ended: deque[tuple[_Active, Utterance]] = deque()
        started = time.perf_counter()
        try:
            yield from (self._live(chunks) if live else self._batch(chunks))
        finally:
            self.stats.wall_seconds = time.perf_counter() - started

    def _batch(self, chunks: Iterable[np.ndarray]) -> Iterator[Caption]:
        for chunk in chunks:
            self._ingest(chunk, time.monotonic())
            while self.ended:
                yield self._finish(*self.ended.popleft(), live=False)
        self._close_stream()
        while self.ended:
            yield self._finish(*self.ended.popleft(), live=False)

    def _live(self, chunks: Iterable[np.ndarray]) -> Iterator[Caption]:
        inbox: queue.Queue = queue.Queue()
        stop = threading.Event()

        def read() -> None:
            try:
                for chunk in chunks:
                    inbox.put((chunk, time.monotonic()))
                    if stop.is_set():
                        return
                inbox.put(None)
            except BaseException as e:  # a decoding error mid-stream: the worker raises it
                inbox.put(e)

        reader = threading.Thread(target=read, name="qwenkit-audio", daemon=True)
        reader.start()
        done = False
        try:
            while True:
                waiting = not done and not self.ended
                while True:  # take all the audio that has arrived; wait briefly only when idle
                    try:
                        item = inbox.get(timeout=0.05) if waiting else inbox.get_nowait()
                    except queue.Empty:
                        break
                    waiting = False
                    if item is None:
                        done = True
                        self._close_stream()
                        break
                    if isinstance(item, BaseException):
                        raise item
                    self._ingest(*item)
                if self.ended:
                    yield self._finish(*self.ended.popleft(), live=True)
                elif self.active is not None and self.partials:
                    yield from self._partial_step()
                elif done:
                    return
        finally:
            stop.set()

    # ---- audio and utterances ----------------------------------------------------------------------------------------
    def _ingest(self, chunk: np.ndarray, arrived: float) -> None:
        self.audio.append(chunk, arrived)
        self.stats.audio_seconds += chunk.size / SAMPLE_RATE
        for utterance in self.vad.feed(chunk):
            self._ended(utterance)
        self._forget_dropped()  # so an active utterance here is the detector's one in progress
        if self.vad.in_speech and self.active is None:
            self.active = _Active(self._next_index(), self.vad.speech_start)
        starts = [u.start for _, u in self.ended] + [self.active.start if self.active else self.audio.end]
        self.audio.forget_before(min(starts) - self.pad)

    def _ended(self, utterance: Utterance) -> None:
        state = self.active if self.active is not None and self.active.start == utterance.start else None
        if state is None:
            state = _Active(self._next_index(), utterance.start)
        self.ended.append((state, utterance))
        self.active = None

    def _close_stream(self) -> None:
        for utterance in self.vad.flush():
            self._ended(utterance)
        self._forget_dropped()

    def _forget_dropped(self) -> None:
        # A burst too short to be speech ends with no utterance (the detector drops it): whatever was heard of it
        # so far goes, or the live loop would go on transcribing it (and keeping its audio) forever.
        if self.active is not None and self.vad.speech_start != self.active.start:
            self.active = None

    def _next_index(self) -> int:
        self.count += 1
        return self.count

    # ---- compute -------------------------------------------------------------------------------------------------
    def _transcribe(self, state: _Active, end: int) -> None:
        audio = self.audio.span(state.start - self.pad, end)
        started = time.perf_counter()
        hyp: Hypothesis = self.asr.transcribe(audio, prefix=state.fixed_tokens)
        self.stats.asr_seconds += time.perf_counter() - started
        self.stats.asr_calls += 1
        self.stats.fallbacks += hyp.fallback
        if state.tokens is not None:
            agreed = common_tokens(state.tokens, hyp.tokens)
            if len(agreed) > len(state.fixed_tokens):
                state.fixed_tokens = self.asr.complete_prefix(agreed)
        state.tokens, state.heard_to = hyp.tokens, end
        state.source = self.convert(hyp.text.strip())

    def _translate(self, state: _Active) -> None:
        if self.translator is None or not state.source:
            state.translated, state.text = state.source, ""
            return
        started = time.perf_counter()
        try:
            text = self.translator.translate(state.source, prefix=state.fixed_text)
        except TranslationError as e:  # the model is unreachable: captions go on with the source text
            self.stats.mt_errors += 1
            if self.stats.mt_errors == 1 or self.stats.mt_errors % 20 == 0:
                log.warning("%s (%d so far); showing the transcript untranslated", e, self.stats.mt_errors)
            state.translated, state.text = state.source, state.fixed_text
            return
        finally:
            self.stats.mt_seconds += time.perf_counter() - started
        self.stats.mt_calls += 1
        if state.translated is not None and state.text:
            agreed = common_text(state.text, text)
            if len(agreed) > len(state.fixed_text):
                state.fixed_text = agreed
        state.translated, state.text = state.source, text

    def _partial_step(self) -> Iterator[Caption]:
        """One piece of work on the utterance being spoken: transcribe more of it, or translate what changed."""
        state = self.active
        pause = self.vad.pause_at
        target = None
        if pause is not None:
            if self.audio.end >= pause + self.pad and state.heard_to != pause + self.pad:
                target = pause + self.pad  # the span the final caption will use, if this pause is the end
        elif self.audio.end - max(state.heard_to, state.start) >= self.partial_every * SAMPLE_RATE:
            target = self.audio.end
        if target is not None:
            self._transcribe(state, target)
            yield self._caption(state, final=False)
        elif state.tokens is not None and state.translated != state.source and state.source:
            self._translate(state)
            yield self._caption(state, final=False)
        else:
            time.sleep(0.01)  # nothing to do until more audio arrives

    def _finish(self, state: _Active, utterance: Utterance, live: bool) -> Caption:
        end = utterance.end + self.pad
        reused = state.heard_to == end
        if not reused:
            self._transcribe(state, end)
        if state.translated != state.source:
            reused = False
            self._translate(state)
        self.stats.reused += reused
        caption = self._caption(state, final=True, utterance=utterance)
        if live:
            arrived = self.audio.arrived(utterance.end)
            caption.latency = time.monotonic() - arrived if arrived is not None else None
        return caption

    def _caption(self, state: _Active, final: bool, utterance: Utterance | None = None) -> Caption:
        end = (utterance.end if utterance else self.audio.end) / SAMPLE_RATE
        fixed = self.convert(self.asr.text_of(state.fixed_tokens).strip())
        return Caption(index=state.index, start=state.start / SAMPLE_RATE, end=end, source=state.source,
                       text=state.text, final=final, source_fixed=state.source if final else fixed,
                       text_fixed=state.text if final else state.fixed_text)


def _script_converter(language: str, script: str):
    """Whisper writes Mandarin in either script, sometimes both in one sentence: convert to one (OpenCC)."""
    if language != "zh" or script == "asis":
        return lambda text: text
    import opencc

    converter = opencc.OpenCC({"simplified": "t2s", "traditional": "s2t"}[script])
    return converter.convert
