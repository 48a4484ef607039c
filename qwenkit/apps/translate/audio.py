"""Audio in: 16 kHz mono float32 chunks from a file, from raw PCM on a stream (stdin), or from a microphone.

Every source is an iterator of numpy float32 arrays in [-1, 1] at SAMPLE_RATE, decoded and resampled as it goes
(PyAV, which bundles FFmpeg: wav, mp3, flac, ogg/opus, m4a... and ALSA/PulseAudio capture), so a long recording or
a live stream never has to fit in memory. `paced()` releases a source's chunks no faster than real time, which is
how a file stands in for a live talk (the benchmark, the web page demo).

Bad input raises AudioError naming the file: missing, unreadable, not audio, no audio stream, a sample rate out of
range. A file that holds no samples at all yields nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qwenkit.errors import QwenkitError

SAMPLE_RATE = 16000
CHUNK_SECONDS = 0.1
PCM_FORMATS = {"s16le": ("s16", np.int16), "f32le": ("flt", np.float32)}
MIN_RATE, MAX_RATE = 4000, 384000


class AudioError(QwenkitError):
    """An audio input qwenkit cannot read: missing or unreadable file, not audio, bad PCM parameters, no device."""


def _rechunk(pieces: Iterable[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """Regroup arrays into chunks of exactly `chunk` samples (the last one shorter)."""
    buffer: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        if piece.size == 0:
            continue
        buffer.append(piece)
        held += piece.size
        if held >= chunk:
            joined = np.concatenate(buffer)
            whole = (joined.size // chunk) * chunk
            for i in range(0, whole, chunk):
                yield joined[i:i + chunk]
            rest = joined[whole:]
            buffer, held = ([rest] if rest.size else []), rest.size
    if held:
        yield np.concatenate(buffer)


def _resampled(frames: Iterable, resampler) -> Iterator[np.ndarray]:
    """PyAV frames through a resampler to mono float32 at SAMPLE_RATE, flushed at the end."""
    for frame in frames:
        frame.pts = None  # the resampler makes its own timeline; some demuxers give gaps or no pts
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    for out in resampler.resample(None):
        yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)


def _new_resampler():
    import av

    return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)


def file_chunks(path: str | Path, chunk_seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """Decode an audio (or video) file to 16 kHz mono chunks. The file is checked before the first chunk."""
    import av

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise AudioError(f"{path}: not an audio file qwenkit can read ({_why(e)})") from None
    if not container.streams.audio:
        container.close()
        raise AudioError(f"{path}: has no audio stream")
    return _rechunk(_decode(container, path), int(chunk_seconds * SAMPLE_RATE))


def _decode(container, path: Path) -> Iterator[np.ndarray]:
    import av

    try:
        stream = container.streams.audio[0]
        yield from _resampled(container.decode(stream), _new_resampler())
    except av.error.FFmpegError as e:
        raise AudioError(f"{path}: the audio cannot be decoded ({_why(e)})") from None
    finally:
        container.close()


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.split(": '", 1)[0].strip() or type(e).__name__


def pcm_chunks(stream: BinaryIO, *, rate: int = SAMPLE_RATE, fmt: str = "s16le", channels: int = 1,
               chunk_seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """Raw interleaved PCM (s16le or f32le) read from a binary stream, resampled to 16 kHz mono as it arrives."""
    import av

    if fmt not in PCM_FORMATS:
        raise AudioError(f"PCM format {fmt!r}: use one of {', '.join(PCM_FORMATS)}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"PCM sample rate {rate} Hz is out of range ({MIN_RATE} to {MAX_RATE} Hz)")
    if not 1 <= channels <= 8:
        raise AudioError(f"PCM channels must be 1 to 8, got {channels}")
    av_format, dtype = PCM_FORMATS[fmt]
    frame_bytes = np.dtype(dtype).itemsize * channels
    block = max(frame_bytes, int(rate * chunk_seconds) * frame_bytes)
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")

    def frames() -> Iterator:
        carry = b""
        while True:
            data = stream.read(block)
            if not data:
                return
            data = carry + data
            usable = len(data) - len(data) % frame_bytes
            carry = data[usable:]
            if not usable:
                continue
            samples = np.frombuffer(data[:usable], dtype=dtype).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format=av_format, layout=layout)
            frame.sample_rate = rate
            yield frame

    return _rechunk(_resampled(frames(), _new_resampler()), int(chunk_seconds * SAMPLE_RATE))


def microphone_chunks(device: str | None = None, chunk_seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """Live capture through FFmpeg's PulseAudio or ALSA input ('default' device unless one is named)."""
    import av

    errors = []
    for fmt in ("pulse", "alsa"):
        try:
            with _quiet_native_stderr():  # alsa-lib prints its own complaints before FFmpeg reports the failure
                container = av.open(device or "default", format=fmt, mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            errors.append(f"{fmt}: {_why(e)}")
            continue
        if container.streams.audio:
            name = Path(f"{fmt}:{device or 'default'}")
            return _rechunk(_decode(container, name), int(chunk_seconds * SAMPLE_RATE))
        container.close()
    raise AudioError(f"no microphone could be opened ({'; '.join(errors) or 'no audio input'}); "
                     "give an audio file, or raw PCM on stdin as '-'")


@contextlib.contextmanager
def _quiet_native_stderr():
    """File descriptor 2 to /dev/null for the duration (what C libraries write there, Python's own stderr too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def paced(chunks: Iterable[np.ndarray], speed: float = 1.0, clock=time.monotonic, sleep=time.sleep
          ) -> Iterator[np.ndarray]:
    """Yield each chunk no earlier than the moment its last sample would have been heard live (speed 2.0: twice
    as fast)."""
    start = clock()
    heard = 0
    for chunk in chunks:
        heard += chunk.size
        wait = start + heard / SAMPLE_RATE / speed - clock()
        if wait > 0:
            sleep(wait)
        yield chunk


def stdin_binary() -> BinaryIO:
    return sys.stdin.buffer
