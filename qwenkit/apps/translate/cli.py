"""`qwenkit translate`: live captions from audio (a file, raw PCM on stdin, a microphone), or text translation.

    qwenkit translate talk.mp3                         English captions of a Mandarin recording, as fast as it decodes
    qwenkit translate talk.mp3 --realtime --web 8080   played as if live: partial captions on a heads-up web page
    arecord -f S16_LE -r 16000 -c 1 | qwenkit translate - --pcm-rate 16000
    qwenkit translate --mic
    qwenkit translate --text notes.txt --from en --to zh --glossary terms.tsv

Captions go to the terminal (redrawn in place on a tty; one line per caption otherwise), and to --srt / --jsonl
files and the --web page when asked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwenkit.apps.backend import add_arguments as backend_arguments
from qwenkit.errors import BadConfig

DEFAULT_ASR = "whisper:base"
ADAPTER = "adapter"  # the name --adapter is served under, in this process


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="an audio file (wav, mp3, flac, ogg, m4a...); '-' reads raw PCM from "
                   "stdin; with --text, a text file (default: stdin)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mic", nargs="?", const="default", metavar="DEVICE",
                        help="capture from a microphone (PulseAudio or ALSA device; default: 'default')")
    source.add_argument("--text", action="store_true", help="translate lines of text instead of speech")
    p.add_argument("--from", dest="source", default="zh", help="spoken or written language (default zh)")
    p.add_argument("--to", dest="target", default="en", help="language of the captions (default en)")
    p.add_argument("--glossary", metavar="FILE", help="names and terms to translate as given: lines "
                   "'source<TAB>target' or 'source = target', or a JSON object")
    p.add_argument("--realtime", action="store_true", help="play a file at its real speed, as a live talk "
                   "(partial captions, latency as a listener sees it)")
    p.add_argument("--pcm-rate", type=int, default=16000, help="sample rate of raw PCM on stdin (default 16000)")
    p.add_argument("--pcm-format", default="s16le", choices=("s16le", "f32le"), help="raw PCM sample format")
    p.add_argument("--pcm-channels", type=int, default=1, help="raw PCM channels, interleaved (default 1)")
    p.add_argument("--srt", metavar="FILE", help="write the final captions as SubRip subtitles")
    p.add_argument("--jsonl", metavar="FILE", help="write the final captions as JSON lines with timestamps")
    p.add_argument("--jsonl-partials", action="store_true", help="with --jsonl: also every partial update")
    p.add_argument("--web", metavar="[HOST:]PORT", help="serve the heads-up caption page (e.g. 8080 or 0.0.0.0:8080)")
    p.add_argument("--no-partials", action="store_true", help="live sources: only final captions (less compute)")
    p.add_argument("--no-source", action="store_true", help="terminal and subtitles: the translation only")
    p.add_argument("--quiet", action="store_true", help="no captions on the terminal")
    p.add_argument("--asr-model", default=DEFAULT_ASR, help=f"Whisper model: a CTranslate2 folder or a name "
                   f"(default {DEFAULT_ASR}, pulled once and cached)")
    p.add_argument("--beam-size", type=int, default=5, help="Whisper beam size (default 5; 1 is faster)")
    p.add_argument("--script", default="simplified", choices=("simplified", "traditional", "asis"),
                   help="how Mandarin transcripts are written (default simplified)")
    backend_arguments(p, model_help="the translating model: in this process (default qwen2.5-coder:0.5b), or with "
                      "--base-url the name that server knows it by")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (qwenkit tune's or PEFT's folder) over the "
                   "model in this process, e.g. one tuned for the speaker's domain")


def run(args: argparse.Namespace) -> int:
    from qwenkit.apps.backend import local_tokenizer, open_from_args
    from qwenkit.apps.translate.translator import Translator, language_name, read_glossary
    from qwenkit.hub import DEFAULT_MODEL

    language_name(args.source), language_name(args.target)
    if args.source == args.target:  # before minutes of model loading
        raise BadConfig(f"--from and --to are both {args.source!r}")
    if args.web:
        _web_address(args.web)
    glossary = read_glossary(args.glossary) if args.glossary else []
    lines = _text_lines(args.input) if args.text else None
    if not args.text:
        chunks, live = _audio(args)
        asr = _load_asr(args)
    chat = open_from_args(args, DEFAULT_MODEL, lora={ADAPTER: args.adapter} if args.adapter else None)
    try:
        translator = Translator(chat, args.source, args.target, glossary=glossary,
                                model=ADAPTER if args.adapter else None, vocabulary=local_tokenizer(chat),
                                examples=not args.adapter)
        if args.text:
            return _translate_lines(translator, lines, interactive=args.input in (None, "-") and sys.stdin.isatty())
        return _caption(args, asr, translator, chunks, live)
    finally:
        chat.close()


# ---- speech ------------------------------------------------------------------------------------------------------
def _audio(args: argparse.Namespace):
    from qwenkit.apps.translate import audio

    if args.mic:
        if args.input:
            raise BadConfig("give an input file or --mic, not both")
        return audio.microphone_chunks(None if args.mic == "default" else args.mic), True
    if args.input is None:
        raise BadConfig("give an audio file, '-' for raw PCM on stdin, --mic, or --text")
    if args.input == "-":
        return audio.pcm_chunks(audio.stdin_binary(), rate=args.pcm_rate, fmt=args.pcm_format,
                                channels=args.pcm_channels), True
    chunks = audio.file_chunks(args.input)
    return (audio.paced(chunks) if args.realtime else chunks), args.realtime


def _load_asr(args: argparse.Namespace):
    from qwenkit import hub
    from qwenkit.apps.translate.asr import WhisperASR

    folder = hub.pull(args.asr_model)
    return WhisperASR(folder, language=args.source, threads=args.threads or 2, beam_size=args.beam_size)


def _sinks(args: argparse.Namespace) -> list:
    from qwenkit.apps.translate.outputs import JsonlWriter, SrtWriter, TerminalView

    sinks: list = []
    try:
        if args.srt:
            sinks.append(SrtWriter(args.srt, with_source=not args.no_source))
        if args.jsonl:
            sinks.append(JsonlWriter(args.jsonl, partials=args.jsonl_partials))
        if args.web:
            from qwenkit.apps.translate.web import CaptionServer

            server = CaptionServer(*_web_address(args.web))
            sinks.append(server)
            print(f"captions at {server.url}", file=sys.stderr, flush=True)
        if not args.quiet:
            sinks.append(TerminalView(show_source=not args.no_source))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _web_address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise BadConfig(f"--web takes PORT or HOST:PORT with a port from 0 to 65535, not {spec!r}")
    return host or "127.0.0.1", int(port)


def _caption(args, asr, translator, chunks, live: bool) -> int:
    from qwenkit.apps.translate.captioner import Captioner

    captioner = Captioner(asr, translator, partials=not args.no_partials, script=args.script)
    sinks = _sinks(args)
    finals = 0
    try:
        for caption in captioner.captions(chunks, live=live):
            finals += caption.final and bool(caption.text or caption.source)
            for sink in sinks:
                sink.add(caption)
    finally:
        for sink in sinks:
            sink.close()
    s = captioner.stats
    if finals == 0:
        print(f"no speech found in {s.audio_seconds:.1f} s of audio", file=sys.stderr)
    elif sys.stderr.isatty() or args.verbose:
        print(f"[{finals} captions, {s.audio_seconds:.1f} s of audio, real-time factor {s.rtf:.2f}]",
              file=sys.stderr)
    return 0


# ---- text --------------------------------------------------------------------------------------------------------
def _text_lines(name: str | None) -> Iterator[str]:
    if name is None or name == "-":
        return (line.rstrip("\n") for line in sys.stdin)
    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadConfig(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadConfig(f"{path}: cannot read it as UTF-8 text ({e})") from None
    return iter(text.splitlines())


def _translate_lines(translator, lines: Iterator[str], interactive: bool, workers: int = 4) -> int:
    """Several lines in flight at once (the engine batches them), printed in input order as each is ready; typed
    lines (interactive: stdin a terminal) one at a time, each answered at once."""
    if interactive:
        for line in lines:
            print(translator.translate(line), flush=True)
        return 0
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for line in lines:
            pending.append(pool.submit(translator.translate, line))
            while pending and (pending[0].done() or len(pending) >= 2 * workers):
                print(pending.pop(0).result(), flush=True)
        for future in pending:
            print(future.result(), flush=True)
    return 0
