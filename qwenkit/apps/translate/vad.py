"""Voice activity, streaming: Silero VAD (the ONNX model faster-whisper ships) over 32 ms frames, turned into
utterances as audio arrives.

`SpeechDetector.feed(samples)` runs the model on every whole 512-sample frame, carrying the model's state and the
64-sample context between calls, so the probabilities equal a single pass over the whole recording however the
audio is chunked. An utterance starts at the first frame at or above `threshold`; it ends at the first frame below
`neg_threshold` that is followed by `min_silence` seconds without speech. While that silence is still running,
`pause_at` says where the utterance would end, so the caller can start on it early. Utterances longer than
`max_speech` seconds are cut at their quietest recent frame, so one long talk still gets captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from qwenkit.apps.translate.audio import SAMPLE_RATE

FRAME = 512
CONTEXT = 64


@dataclass(frozen=True)
class VadOptions:
    threshold: float = 0.5
    neg_threshold: float = 0.35
    min_silence: float = 0.4  # seconds of silence that end an utterance
    min_speech: float = 0.25  # shorter bursts (clicks, coughs) are dropped
    max_speech: float = 15.0  # longer utterances are cut
    pad: float = 0.2  # seconds of audio kept on each side of an utterance


@dataclass(frozen=True)
class Utterance:
    """Samples [start, end) of the stream hold speech (before padding)."""

    start: int
    end: int


@cache
def _session():
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    path = Path(get_assets_path()) / "silero_vad_v6.onnx"
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=opts)


class SileroStream:
    """Speech probability per 512-sample frame, fed in pieces of any size."""

    def __init__(self) -> None:
        self.session = _session()
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        n = data.size // FRAME
        self.pending = data[n * FRAME:]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        frames = data[:n * FRAME].reshape(n, FRAME)
        contexts = np.concatenate([self.context[None], frames[:-1, -CONTEXT:]])
        self.context = frames[-1, -CONTEXT:].copy()
        batch = np.concatenate([contexts, frames], axis=1)
        probs, self.h, self.c = self.session.run(None, {"input": batch, "h": self.h, "c": self.c})
        return np.asarray(probs, dtype=np.float32).reshape(-1)


class SpeechDetector:
    """Utterances from a stream of samples: `feed` returns the utterances that ended within the new audio."""

    def __init__(self, options: VadOptions | None = None) -> None:
        self.options = o = options or VadOptions()
        self.model = SileroStream()
        self.frames = 0  # frames seen
        self.start: int | None = None  # first frame of the utterance in progress
        self.silence_from: int | None = None  # first frame of the silence that may end it
        self.recent: list[float] = []  # probabilities since the utterance began (for cutting long ones)
        self.min_silence = int(o.min_silence * SAMPLE_RATE / FRAME)
        self.min_speech = int(o.min_speech * SAMPLE_RATE / FRAME)
        self.max_speech = int(o.max_speech * SAMPLE_RATE / FRAME)

    @property
    def in_speech(self) -> bool:
        return self.start is not None

    @property
    def speech_start(self) -> int | None:
        """Sample where the utterance in progress began (None between utterances)."""
        return None if self.start is None else self.start * FRAME

    @property
    def pause_at(self) -> int | None:
        """Sample where the utterance in progress would end if the silence running now lasts (None otherwise)."""
        return None if self.start is None or self.silence_from is None else self.silence_from * FRAME

    def feed(self, samples: np.ndarray) -> list[Utterance]:
        ended: list[Utterance] = []
        o = self.options
        for p in self.model.feed(samples):
            i = self.frames
            self.frames += 1
            if self.start is None:
                if p >= o.threshold:
                    self.start, self.silence_from, self.recent = i, None, [p]
                continue
            self.recent.append(p)
            if p >= o.threshold:
                self.silence_from = None
            elif p < o.neg_threshold and self.silence_from is None:
                self.silence_from = i
            if self.silence_from is not None and i + 1 - self.silence_from >= self.min_silence:
                self._close(self.silence_from, ended)
            elif i + 1 - self.start >= self.max_speech:
                self._cut(ended)
        return ended

    def flush(self) -> list[Utterance]:
        """End of the stream: the utterance in progress ends where its speech stopped (or at the last frame)."""
        ended: list[Utterance] = []
        if self.start is not None:
            self._close(self.silence_from if self.silence_from is not None else self.frames, ended)
        return ended

    def _close(self, end_frame: int, ended: list[Utterance]) -> None:
        if end_frame - self.start >= self.min_speech:
            ended.append(Utterance(self.start * FRAME, end_frame * FRAME))
        self.start, self.silence_from, self.recent = None, None, []

    def _cut(self, ended: list[Utterance]) -> None:
        """Cut a too-long utterance at the quietest frame of its last quarter; the rest starts the next one."""
        tail = self.recent[-max(1, len(self.recent) // 4):]
        quiet = int(np.argmin(tail))
        cut = self.frames - len(tail) + quiet
        start = self.start
        ended.append(Utterance(start * FRAME, cut * FRAME))
        self.recent = self.recent[len(self.recent) - len(tail) + quiet:]
        self.start, self.silence_from = cut, None
