"""Speech recognition of one utterance with Whisper (CTranslate2, int8 on CPU), sized for live captions.

Whisper is trained on 30-second windows, and faster-whisper always encodes one: about 0.56 s of encoder on this
2-core machine for a 2-second sentence. CTranslate2's encoder also takes shorter inputs, so `transcribe` encodes
the utterance plus `context_pad` seconds of silence (a 2-second sentence: 4 s of audio, about 0.07 s), decodes with
timestamps, and keeps only the segments that start inside the real audio. Short contexts sometimes make Whisper
loop ("今天是我的生日今天是我的生日..."); a hypothesis that repeats itself, or compresses too well, is decoded again
on the full 30-second window, the way Whisper's own fallback redoes a failed window.

`prefix` forces the start of the transcript (the part of a live caption already shown), so a caption only grows.
A hypothesis with a high no-speech probability and a low average log-probability (Whisper's own rule), or one
that also needed the fallback, or a very high no-speech probability alone, is silence or noise: it comes back
empty (short contexts make Whisper confident about text it invents in silence: "你也知道你也知道", p=0.93).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenkit.apps.translate.audio import SAMPLE_RATE
from qwenkit.errors import BadCheckpoint

FULL_WINDOW = 30.0
NO_SPEECH = 0.6  # Whisper's no-speech threshold
FRAMES_PER_SECOND = 100  # mel frames; the encoder halves them, and a timestamp token is one encoder frame (20 ms)


@dataclass
class Hypothesis:
    """What Whisper heard in one utterance: text tokens (no timestamps or special tokens) and their text."""

    tokens: list[int]
    text: str
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    fallback: bool = False  # decoded again on the full window
    segments: list[tuple[float, float]] = field(default_factory=list)  # (start, end) seconds in the utterance


def repeats_itself(tokens: list[int], min_span: int = 2, min_chars: int = 3, text: str = "") -> bool:
    """True when the token sequence ends in (or contains) a span immediately repeated: the short-context loop."""
    n = len(tokens)
    for span in range(min_span, n // 2 + 1):
        for i in range(0, n - 2 * span + 1):
            if tokens[i:i + span] == tokens[i + span:i + 2 * span]:
                return True
    return len(text) >= 12 and compression_ratio(text) > 2.4


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


class WhisperASR:
    """One CTranslate2 Whisper model folder (model.bin, config.json, tokenizer.json), for one language."""

    def __init__(self, model_dir: str | Path, *, language: str = "zh", threads: int = 2, beam_size: int = 5,
                 context_pad: float = 2.0, compute_type: str = "int8"):
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model_dir = Path(model_dir)
        for name in ("model.bin", "tokenizer.json"):
            if not (model_dir / name).is_file():
                raise BadCheckpoint(f"{model_dir}: not a CTranslate2 Whisper folder (no {name})")
        if language not in _LANGUAGE_CODES:
            raise BadCheckpoint(f"Whisper does not know the language code {language!r}")
        try:
            self.model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type=compute_type,
                                                    intra_threads=threads)
        except (RuntimeError, ValueError) as e:
            raise BadCheckpoint(f"{model_dir}: CTranslate2 cannot load this Whisper model ({e})") from None
        hf = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer = Tokenizer(hf, self.model.is_multilingual, task="transcribe", language=language)
        self.language = language
        self.features = FeatureExtractor(**_feature_kwargs(model_dir))
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        self.beam_size = beam_size
        self.context_pad = context_pad

    # ---- one utterance ------------------------------------------------------------------------------------------
    def transcribe(self, audio: np.ndarray, prefix: list[int] | None = None) -> Hypothesis:
        """Transcribe `audio` (16 kHz mono float32, at most 30 s), starting with the tokens of `prefix`."""
        seconds = audio.size / SAMPLE_RATE
        if seconds > FULL_WINDOW:
            audio, seconds = audio[:int(FULL_WINDOW * SAMPLE_RATE)], FULL_WINDOW
        hyp = self._decode(audio, seconds, prefix or [], min(FULL_WINDOW, seconds + self.context_pad))
        if hyp.text and repeats_itself(hyp.tokens, text=hyp.text) and seconds + self.context_pad < FULL_WINDOW:
            hyp = self._decode(audio, seconds, prefix or [], FULL_WINDOW)
            hyp.fallback = True
        if hyp.no_speech_prob > NO_SPEECH and (hyp.avg_logprob < -1.0 or hyp.fallback) or hyp.no_speech_prob > 0.85:
            return Hypothesis([], "", hyp.no_speech_prob, hyp.avg_logprob, hyp.fallback)
        return hyp

    def _decode(self, audio: np.ndarray, seconds: float, prefix: list[int], window: float) -> Hypothesis:
        import ctranslate2

        frames = min(3000, int(np.ceil(window * FRAMES_PER_SECOND / 2)) * 2)
        padded = np.zeros(frames * 160, dtype=np.float32)
        padded[:audio.size] = audio[:padded.size]
        mel = self.features(padded)[:, :frames]
        encoded = self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])))
        t = self.tokenizer
        prompt = t.sot_sequence + ([t.timestamp_begin] + prefix if prefix else [])
        budget = int(24 + 16 * seconds) + len(prefix)  # Mandarin runs at about 5-8 characters a second
        (result,) = self.model.generate(
            encoded, [prompt], beam_size=self.beam_size, max_length=min(448, len(prompt) + budget),
            suppress_blank=True, suppress_tokens=self.suppress, max_initial_timestamp_index=50,
            return_scores=True, return_no_speech_prob=True, length_penalty=1.0,
        )
        ids = list(result.sequences_ids[0])  # what follows the start sequence: the forced prefix, then the rest
        tokens, segments = self._inside(ids, seconds)
        # CTranslate2's score is already the sum of log-probabilities over length ** length_penalty (1 here); the
        # average Whisper's no-speech rule compares with -1 is that sum over length + 1, as faster-whisper has it.
        avg_logprob = float(result.scores[0]) * len(ids) / (len(ids) + 1) if result.scores else 0.0
        return Hypothesis(tokens, t.decode(tokens), float(result.no_speech_prob), avg_logprob, segments=segments)

    def _inside(self, ids: list[int], seconds: float) -> tuple[list[int], list[tuple[float, float]]]:
        """Text tokens of the segments that start inside the real audio (not in the silent padding)."""
        t = self.tokenizer
        kept: list[int] = []
        segments: list[tuple[float, float]] = []
        start: float | None = None
        current: list[int] = []
        for token in ids:
            if token >= t.timestamp_begin:
                stamp = (token - t.timestamp_begin) * 0.02
                if start is None:
                    start = stamp
                    continue
                if start < seconds - 0.1:
                    kept += current
                    segments.append((start, stamp))
                current, start = [], None
            elif token < t.eot:
                current.append(token)
        if current and (start is None or start < seconds - 0.1):
            kept += current  # a last segment without its closing timestamp
            segments.append((start or 0.0, seconds))
        return kept, segments

    # ---- text ---------------------------------------------------------------------------------------------------
    def text_of(self, tokens: list[int]) -> str:
        """The text of a token prefix, without a character cut in half at its end."""
        return self.tokenizer.decode(tokens).rstrip("\ufffd")

    def complete_prefix(self, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` whose text ends on a whole character (byte-level BPE splits CJK)."""
        n = len(tokens)
        while n and self.tokenizer.decode(tokens[:n]).endswith("\ufffd"):
            n -= 1
        return tokens[:n]


def _feature_kwargs(model_dir: Path) -> dict:
    """The mel settings of preprocessor_config.json when the folder has one (large-v3 uses 128 bins)."""
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"{path}: unreadable ({e})") from None
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft")
    return {k: config[k] for k in keys if k in config}
