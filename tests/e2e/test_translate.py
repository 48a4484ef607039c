"""Live captions end to end on the real models: Whisper base (CTranslate2, from the PyPI mirror) and the default
Qwen2.5-Coder-0.5B, greedy. Four HSK clips (tests/fixtures/hsk-audio, with their reference English) joined with
pauses play the speaker; `qwenkit translate` runs as a subprocess, the heads-up page is read by headless Chromium,
and bad input goes in through the same command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from qwenkit.apps.translate.audio import file_chunks
from qwenkit.apps.translate.scoring import assign, char_error_rate, joined
from tests.e2e.test_serve import free_port

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
CLIPS = Path(__file__).resolve().parents[1] / "fixtures" / "hsk-audio"
ROWS = [json.loads(line) for line in (CLIPS / "sentences.jsonl").read_text(encoding="utf-8").splitlines()]
GAP = 1.0
CHRF_FLOOR = 40.0  # these four clips caption at chrF ~75 today; a broken stage (wrong language, garbage) is < 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chrf(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(hyps, [refs]).score


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """The four clips with GAP seconds of silence after each, as a 16 kHz WAV; and each clip's (start, end)."""
    pieces, spans, at = [], [], 0
    for row in ROWS:
        samples = np.concatenate(list(file_chunks(CLIPS / row["audio"])))
        spans.append((at / 16000, (at + samples.size) / 16000))
        pieces += [samples, np.zeros(int(GAP * 16000), np.float32)]
        at += samples.size + int(GAP * 16000)
    audio = np.concatenate(pieces)
    path = tmp_path_factory.mktemp("talk") / "talk.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    return path, spans, audio


def translate(*args, model: Path, stdin: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenkit", "translate", *map(str, args), "--model", str(model),
                           "--threads", "2"], input=stdin, capture_output=True, timeout=timeout)


def finals_of(path: Path) -> list:
    from qwenkit.apps.translate.captioner import Caption

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [Caption(**r) for r in rows]


def check_captions(captions, spans, audio_seconds: float) -> tuple[list[str], list[str]]:
    """Final captions in order, timestamps inside the audio and not overlapping, one group per clip."""
    finals = [c for c in captions if c.final]
    assert [c.index for c in finals] == sorted(c.index for c in finals)
    for a, b in zip(finals, finals[1:]):
        assert a.end <= b.start
    assert all(0 <= c.start < c.end <= audio_seconds for c in finals)
    groups = assign(finals, spans)
    assert all(groups), f"a clip got no caption: {[joined(g, 'text') for g in groups]}"
    return [joined(g, "source") for g in groups], [joined(g, "text") for g in groups]


def test_a_file_is_captioned_with_timestamps_in_order(talk, whisper_base, default_gguf, tmp_path):
    path, spans, audio = talk
    srt, jsonl = tmp_path / "talk.srt", tmp_path / "talk.jsonl"
    proc = translate(path, "--srt", srt, "--jsonl", jsonl, model=default_gguf)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    captions = finals_of(jsonl)
    sources, texts = check_captions(captions, spans, audio.size / 16000)
    assert char_error_rate([r["zh"] for r in ROWS], sources) <= 0.15
    assert chrf(texts, [r["en"] for r in ROWS]) >= CHRF_FLOOR
    # stdout (not a terminal): one line per final caption, the translation
    assert proc.stdout.decode().splitlines() == [c.text for c in captions]
    cues = srt.read_text(encoding="utf-8").strip().split("\n\n")
    assert len(cues) == len(captions)
    for n, (cue, c) in enumerate(zip(cues, captions), start=1):
        number, times, english, chinese = cue.split("\n")
        assert int(number) == n and english == c.text and chinese == c.source
        start, end = times.split(" --> ")
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3}", start) and start < end


def test_live_captions_only_grow_and_end_as_the_final(talk, whisper_base, default_gguf):
    """A file played in real time, as a listener hears it: partial captions whose fixed text never changes."""
    from qwenkit.apps.backend import open_chat
    from qwenkit.apps.translate.asr import WhisperASR
    from qwenkit.apps.translate.audio import paced
    from qwenkit.apps.translate.captioner import Captioner
    from qwenkit.apps.translate.translator import Translator

    path, spans, audio = talk
    chat = open_chat(str(default_gguf), threads=2)
    try:
        captioner = Captioner(WhisperASR(whisper_base, threads=2), Translator(chat))
        chunks = (audio[i:i + 1600] for i in range(0, audio.size, 1600))
        captions = list(captioner.captions(paced(chunks), live=True))
    finally:
        chat.close()
    sources, texts = check_captions(captions, spans, audio.size / 16000)
    assert chrf(texts, [r["en"] for r in ROWS]) >= CHRF_FLOOR
    partials = [c for c in captions if not c.final]
    assert partials, "a live source gets partial captions while someone speaks"
    for index in {c.index for c in captions}:
        updates = [c for c in captions if c.index == index]
        assert updates[-1].final and all(not c.final for c in updates[:-1])
        final = updates[-1]
        for a, b in zip(updates, updates[1:]):  # what was fixed stays, in the source and in the translation
            assert b.text_fixed.startswith(a.text_fixed) and b.source_fixed.startswith(a.source_fixed)
        assert final.text.startswith(updates[-2].text_fixed if len(updates) > 1 else "")
        assert final.latency is not None and final.latency > 0
    stats = captioner.stats
    assert stats.asr_calls > len(spans) and stats.audio_seconds == pytest.approx(audio.size / 16000)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_the_web_page_shows_the_captions_of_a_file_being_played(talk, whisper_base, default_gguf, tmp_path):
    from playwright.sync_api import sync_playwright

    path, spans, audio = talk
    port, jsonl = free_port(), tmp_path / "web.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "qwenkit", "translate", str(path), "--realtime", "--web",
                             f"127.0.0.1:{port}", "--jsonl", str(jsonl), "--model", str(default_gguf), "--threads",
                             "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen_live = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            deadline = time.monotonic() + 300
            while True:  # the page is served once the models are loaded
                try:
                    page.goto(f"http://127.0.0.1:{port}/", timeout=2000)
                    break
                except Exception:
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
            while page.inner_text("#state") != "ended":
                assert time.monotonic() < deadline, "the page never saw the end of the audio"
                live = page.inner_text("#live")
                if live.strip():
                    seen_live.append(live)
                page.wait_for_timeout(100)
            shown = page.eval_on_selector_all(".done .fixed", "els => els.map(e => e.textContent)")
            sources = page.eval_on_selector_all(".done .src", "els => els.map(e => e.textContent)")
            browser.close()
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = finals_of(jsonl)
    check_captions(finals, spans, audio.size / 16000)
    assert shown == [c.text for c in finals][-3:]  # the page keeps the last three captions
    assert sources == [c.source for c in finals][-3:]
    assert seen_live, "the caption being spoken was shown before it was final"


def run_quick(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`qwenkit translate` for inputs refused before any model loads."""
    return subprocess.run([sys.executable, "-m", "qwenkit", "translate", *args], input=stdin, capture_output=True,
                          timeout=120)


def test_bad_input_gets_one_clear_line(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 40)
    cases = [
        ([str(tmp_path / "missing.mp3")], None, "missing.mp3: no such file"),
        ([str(tmp_path / "empty.mp3")], None, "empty.mp3: the file is empty"),
        ([str(tmp_path / "notes.wav")], None, "notes.wav: not an audio file"),
        ([str(tmp_path)], None, "is a folder"),
        (["-", "--pcm-rate", "100"], b"\0" * 3200, "PCM sample rate 100 Hz is out of range"),
        (["--from", "xx", str(tmp_path / "empty.mp3")], None, "unknown language code 'xx'"),
        ([], None, "give an audio file"),
        (["--text", str(tmp_path / "missing.txt")], None, "missing.txt: no such file"),
        (["--glossary", str(tmp_path / "notes.wav"), "--text"], None, "notes.wav:1: expected"),
        (["--from", "en", "--to", "en", "--text"], None, "--from and --to are both 'en'"),
        (["--web", "70000", str(tmp_path / "empty.mp3")], None, "a port from 0 to 65535, not '70000'"),
    ]
    for args, stdin, message in cases:
        proc = run_quick(*args, stdin=stdin)
        err = proc.stderr.decode()
        assert proc.returncode == 1, (args, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_silence_noise_and_another_sample_rate(talk, whisper_base, default_gguf, tmp_path):
    """Silence and noise give no captions and exit 0; PCM at 8 kHz on stdin is resampled and captioned."""
    path, spans, audio = talk
    rng = np.random.default_rng(0)
    quiet = np.concatenate([np.zeros(3 * 16000), rng.normal(0, 0.3, 3 * 16000)]).astype(np.float32)
    for name, samples in (("silence-and-noise", quiet),):
        wav = tmp_path / f"{name}.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        srt = tmp_path / f"{name}.srt"
        proc = translate(wav, "--srt", srt, model=default_gguf)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert proc.stdout == b"" and srt.read_text() == ""
        assert "no speech found in 6.0 s of audio" in proc.stderr.decode()
    pcm8k = (audio[::2] * 32767).astype("<i2").tobytes()
    jsonl = tmp_path / "8k.jsonl"
    proc = translate("-", "--pcm-rate", "8000", "--jsonl", jsonl, "--no-partials", model=default_gguf, stdin=pcm8k)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    sources, texts = check_captions(finals_of(jsonl), spans, audio.size / 16000 + 0.01)
    assert chrf(texts, [r["en"] for r in ROWS]) >= CHRF_FLOOR


def test_text_mode_both_ways_with_a_glossary(default_gguf, tmp_path):
    glossary = tmp_path / "names.tsv"
    glossary.write_text("王小明\tWang Xiaoming\n", encoding="utf-8")
    lines = "他把中文翻译成英文。\n\n王小明是我的朋友。\n".encode()
    proc = translate("--text", "--glossary", glossary, model=default_gguf, stdin=lines)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().split("\n")
    assert len(out) == 4 and out[3] == ""  # one line out per line in, the empty one kept
    assert "translat" in out[0].lower() and "english" in out[0].lower()
    assert out[1] == "" and "Wang Xiaoming" in out[2]
    proc = translate("--text", "--from", "en", "--to", "zh", model=default_gguf,
                     stdin=b"He translated Chinese into English.\n")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    (answer,) = proc.stdout.decode().splitlines()
    assert re.search(r"[\u4e00-\u9fff]", answer) and "英" in answer


QUESTIONS = Path(__file__).resolve().parents[1] / "fixtures" / "translate" / "questions.jsonl"


def test_questions_are_translated_as_questions(default_gguf):
    """43 Mandarin questions of all six HSK levels, written for this test (no HSK benchmark sentence, nothing the
    translator was tuned on): every English line is a question, not an answer to it."""
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 40 and {r["level"] for r in rows} == set(range(1, 7))
    proc = translate("--text", model=default_gguf, stdin="\n".join(r["zh"] for r in rows).encode() + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().splitlines()
    assert len(out) == len(rows)
    answered = [(r["zh"], line) for r, line in zip(rows, out) if not line.rstrip().endswith("?")]
    assert not answered, answered


NAMES_NUMBERS = QUESTIONS.with_name("names_numbers.jsonl")


def test_names_and_numbers_are_carried_over(default_gguf):
    """12 sentences written for this test, with people's names (王小明, 小王, 王先生, 刘洋...) and numbers (三点,
    二十五, 两百, 七月十号, 星期五, 一千): each English line shows every one of them, in some form English writes it."""
    rows = [json.loads(line) for line in NAMES_NUMBERS.read_text(encoding="utf-8").splitlines()]
    proc = translate("--text", model=default_gguf, stdin="\n".join(r["zh"] for r in rows).encode() + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().splitlines()
    assert len(out) == len(rows)
    dropped = [(r["zh"], line, keep) for r, line in zip(rows, out) for keep in r["keep"]
               if not any(form in line.lower().replace(",", "") for form in keep)]
    assert not dropped, dropped


@pytest.mark.skipif(Path("/dev/snd").exists(), reason="this machine has sound devices: --mic would record")
def test_no_microphone_is_one_clear_line():
    proc = run_quick("--mic")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "no microphone could be opened" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # alsa-lib's own complaints are kept off the terminal
