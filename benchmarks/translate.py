#!/usr/bin/env python
"""Live captions over the 180 HSK clips (Mandarin speech with reference English): quality, speed, latency.

    python benchmarks/translate.py                       # live: the clips played in real time, one long stream
    python benchmarks/translate.py --fast                # each utterance captioned once, as fast as it decodes
    python benchmarks/translate.py --limit 20 --gold     # a quick look, plus the gold Chinese text translated
    python benchmarks/translate.py --adapter hsk-zh-en   # translating with a LoRA adapter (README: tuned on HSK)
    python benchmarks/translate.py --text-only           # gold Chinese only: the 180 clips beside the held-out set

The clips (../shared/data/hsk-audio: sentences.jsonl and one MP3 each) are decoded to 16 kHz and joined into one
stream with --gap seconds of silence after each, as a speaker pausing between sentences. The stream goes through
qwenkit.apps.translate.Captioner exactly as `qwenkit translate --realtime` runs it (Whisper base, the default Qwen
model on-device, 2 threads), fed no faster than real time (--fast: no pacing, no partial captions). Each final
caption is assigned to the clip it overlaps most (scoring.py).

Reported:
- CER of recognition against the clips' Chinese (simplified, no punctuation);
- BLEU and chrF (sacrebleu, corpus level) of the captions against the reference English; with --gold also of the
  gold Chinese translated by the same translator (the translation's own ceiling);
- real-time factor: compute seconds (Whisper + Qwen) per second of audio, and wall time over audio time;
- latency: for each final caption, wall seconds from the arrival of the audio where its speech ended to the caption
  (the VAD's wait for silence included), median / p90 / max.
--text-only translates the gold Chinese of the 180 clips and of the 300 held-out sentences (benchmarks/hsk_sets.py:
chosen by a fixed rule, never tuned on; text only, the package has no audio for them) and reports both side by
side: BLEU, chrF, how many questions came back as questions, how many sentences with numbers kept them all
(qwenkit.apps.translate.numbers), guarded re-asks, seconds per sentence.
Prints a table, writes JSON (benchmarks/results/translate-<date>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import busy_share, write_result  # noqa: E402

CLIPS = ROOT.parent / "shared" / "data" / "hsk-audio"
TARGETS = {"rtf": 1.0, "latency_median": 2.0, "bleu": 20.0, "chrf": 45.0}


def load_clips(folder: Path, limit: int | None):
    import numpy as np

    from qwenkit.apps.translate.audio import file_chunks

    rows = [json.loads(line) for line in (folder / "sentences.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][:limit]
    for row in rows:
        row["samples"] = np.concatenate(list(file_chunks(folder / row["audio"])))
    return rows


def build_stream(rows, gap: float):
    """One stream: each clip then `gap` seconds of silence. Returns (samples, [(start, end) seconds per clip])."""
    import numpy as np

    from qwenkit.apps.translate.audio import SAMPLE_RATE

    pieces, spans, at = [], [], 0
    silence = np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)
    for row in rows:
        spans.append((at / SAMPLE_RATE, (at + row["samples"].size) / SAMPLE_RATE))
        pieces += [row["samples"], silence]
        at += row["samples"].size + silence.size
    return np.concatenate(pieces), spans


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, default=CLIPS)
    ap.add_argument("--limit", type=int, help="only the first N clips")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of silence after each clip (default 1.0)")
    ap.add_argument("--fast", action="store_true", help="no real-time pacing and no partial captions")
    ap.add_argument("--no-partials", action="store_true", help="live, but final captions only")
    ap.add_argument("--gold", action="store_true", help="also translate the gold Chinese text")
    ap.add_argument("--text-only", action="store_true",
                    help="no audio: the gold Chinese of the clips and of the held-out set, side by side")
    ap.add_argument("--model", default="qwen2.5-coder:0.5b")
    ap.add_argument("--adapter", type=Path, help="a LoRA adapter over the model (e.g. one tuned on HSK sentences)")
    ap.add_argument("--asr-model", default="whisper:base")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--context-pad", type=float, default=2.0, help="seconds of silence after an utterance in "
                    "Whisper's input (30 or more: the full window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import sacrebleu

    from qwenkit import hub
    from qwenkit.apps.translate.asr import WhisperASR
    from qwenkit.apps.translate.audio import paced
    from qwenkit.apps.translate.captioner import Captioner
    from qwenkit.apps.translate.scoring import assign, char_error_rate, joined

    if args.text_only:
        return text_only(args)
    rows = load_clips(args.clips, args.limit)
    samples, spans = build_stream(rows, args.gap)
    asr = WhisperASR(hub.pull(args.asr_model), threads=args.threads, beam_size=args.beam_size,
                     context_pad=args.context_pad)
    chat, translator = open_translator(args)
    captioner = Captioner(asr, translator, partials=not (args.fast or args.no_partials))
    share = busy_share(2.0)
    print(f"{len(rows)} clips, {samples.size / 16000:.1f} s of audio; CPUs {share:.0%} busy before the run",
          file=sys.stderr)

    chunks = (samples[i:i + 1600] for i in range(0, samples.size, 1600))
    live = not args.fast
    finals = []
    started = time.monotonic()
    for caption in captioner.captions(paced(chunks) if live else chunks, live=live):
        if caption.final:
            finals.append(caption)
            print(f"  [{caption.start:7.2f}-{caption.end:7.2f}] {caption.source} | {caption.text}"
                  + (f" ({caption.latency:.2f} s)" if caption.latency is not None else ""), file=sys.stderr)
    wall = time.monotonic() - started
    stats = captioner.stats

    groups = assign(finals, spans)
    sources = [joined(g, "source") for g in groups]
    hyps = [joined(g, "text") for g in groups]
    refs = [r["en"] for r in rows]
    result = {
        "clips": len(rows), "audio_seconds": round(samples.size / 16000, 2), "gap": args.gap,
        "mode": "fast" if args.fast else ("live, finals only" if args.no_partials else "live"),
        "model": args.model, "adapter": str(args.adapter) if args.adapter else None, "asr_model": args.asr_model,
        "beam_size": args.beam_size,
        "context_pad": args.context_pad, "threads": args.threads, "busy_before": round(share, 3),
        "cer": round(char_error_rate([r["zh"] for r in rows], sources), 4),
        "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
        "rtf": round(stats.rtf, 3), "wall_over_audio": round(wall / (samples.size / 16000), 3),
        "asr_seconds": round(stats.asr_seconds, 2), "mt_seconds": round(stats.mt_seconds, 2),
        "asr_calls": stats.asr_calls, "mt_calls": stats.mt_calls, "fallbacks": stats.fallbacks,
        "finals": len(finals), "finals_ready_at_end": stats.reused, "guarded_retries": translator.retries,
        "clips_without_caption": sum(1 for g in groups if not g),
    }
    latencies = [c.latency for c in finals if c.latency is not None]
    if latencies:
        result.update(latency_median=round(statistics.median(latencies), 3),
                      latency_p90=round(percentile(latencies, 0.9), 3), latency_max=round(max(latencies), 3))
    if args.gold:
        gold = [translator.translate(r["zh"]) for r in rows]
        result.update(gold_bleu=round(sacrebleu.corpus_bleu(gold, [refs]).score, 2),
                      gold_chrf=round(sacrebleu.corpus_chrf(gold, [refs]).score, 2))
    result["captions"] = [{"id": r["id"], "zh": r["zh"], "en": r["en"], "heard": s, "caption": h}
                          for r, s, h in zip(rows, sources, hyps)]
    chat.close()

    print(f"\n{'measure':<34}{'value':>10}{'target':>10}")
    for key, label in (("cer", "CER (recognition)"), ("bleu", "BLEU"), ("chrf", "chrF"),
                       ("gold_bleu", "BLEU, gold Chinese translated"), ("gold_chrf", "chrF, gold Chinese translated"),
                       ("rtf", "real-time factor (compute/audio)"), ("wall_over_audio", "wall time / audio time"),
                       ("latency_median", "latency median (s)"), ("latency_p90", "latency p90 (s)"),
                       ("latency_max", "latency max (s)")):
        if key in result:
            target = TARGETS.get(key)
            bound = "" if target is None else (f"<= {target:g}" if key in ("rtf", "latency_median")
                                               else f">= {target:g}")
            print(f"{label:<34}{result[key]:>10}{bound:>10}")
    print(f"{result['finals']} final captions, {result['finals_ready_at_end']} ready when their utterance ended; "
          f"{result['asr_calls']} Whisper and {result['mt_calls']} Qwen calls; {result['fallbacks']} full-window "
          f"fallbacks; {result['clips_without_caption']} clips without a caption")
    write_result(result, "translate", args.out)
    return 0


def open_translator(args):
    """The model (with the adapter, if any) and a translator over it, warmed up: the prompt's prefix is cached from
    here on, as in a running session. An adapter tuned on the plain prompt is asked without the worked examples."""
    from qwenkit.apps.backend import local_tokenizer, open_chat
    from qwenkit.apps.translate.translator import Translator

    chat = open_chat(args.model, threads=args.threads, lora={"adapter": str(args.adapter)} if args.adapter else None)
    translator = Translator(chat, model="adapter" if args.adapter else None, vocabulary=local_tokenizer(chat),
                            examples=not args.adapter)
    translator.translate("你好。")
    return chat, translator


def text_only(args) -> int:
    """The gold Chinese of both sets through the translator, nothing else (see the module doc)."""
    import sacrebleu

    from benchmarks.hsk_sets import clips, heldout, package_sentences
    from qwenkit.apps.translate.numbers import missing_numbers, numbers_in

    chat, translator = open_translator(args)
    sets = {"180 clips": clips(args.clips / "sentences.jsonl")[:args.limit],
            "held-out": heldout(package_sentences())[:args.limit]}
    result = {"mode": "text only", "model": args.model, "adapter": str(args.adapter) if args.adapter else None,
              "threads": args.threads, "sets": {}}
    for name, rows in sets.items():
        retries, started = translator.retries, time.monotonic()
        hyps = [translator.translate(r["zh"]) for r in rows]
        seconds = time.monotonic() - started
        refs = [r["en"] for r in rows]
        questions = [h for r, h in zip(rows, hyps) if r["zh"].rstrip().endswith(("？", "?"))]
        counted = [(r["zh"], h) for r, h in zip(rows, hyps) if numbers_in(r["zh"])]
        result["sets"][name] = {
            "sentences": len(rows), "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2), "questions": len(questions),
            "questions_kept": sum(h.rstrip().endswith("?") for h in questions),
            "with_numbers": len(counted), "numbers_kept": sum(not missing_numbers(zh, h) for zh, h in counted),
            "retries": translator.retries - retries, "seconds_per_sentence": round(seconds / len(rows), 3),
            "translations": [{"id": r["id"], "zh": r["zh"], "en": r["en"], "out": h} for r, h in zip(rows, hyps)]}
    chat.close()
    print(f"\n{'gold Chinese translated':<26}" + "".join(f"{name:>14}" for name in sets))
    for key in ("sentences", "bleu", "chrf", "questions", "questions_kept", "with_numbers", "numbers_kept", "retries",
                "seconds_per_sentence"):
        print(f"{key:<26}" + "".join(f"{result['sets'][name][key]:>14}" for name in sets))
    write_result(result, "translate", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
