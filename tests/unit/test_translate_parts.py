"""The pieces of live captions, each against a reference where one exists: audio decoding against faster-whisper's
decode_audio, streaming VAD against faster-whisper's whole-file Silero pass, plus agreement, subtitles, the
glossary, the translator's requests and the web page's event stream. No model weights are needed."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from qwenkit.apps.translate.agreement import common_text, common_tokens, units
from qwenkit.apps.translate.asr import Hypothesis, repeats_itself
from qwenkit.apps.translate.audio import AudioError, file_chunks, paced, pcm_chunks
from qwenkit.apps.translate.captioner import Caption, Captioner
from qwenkit.apps.translate.names import find_names
from qwenkit.apps.translate.numbers import missing_numbers, numbers_in
from qwenkit.apps.translate.outputs import JsonlWriter, SrtWriter, TerminalView, srt_time
from qwenkit.apps.translate.scoring import assign, char_error_rate, normalize_zh
from qwenkit.apps.translate.translator import (
    EXAMPLES,
    QUESTION_HINT,
    Term,
    Translator,
    clean,
    question_opener,
    read_glossary,
)
from qwenkit.apps.translate.vad import FRAME, SileroStream, SpeechDetector, VadOptions
from qwenkit.errors import BadData

CLIPS = Path(__file__).resolve().parents[1] / "fixtures" / "hsk-audio"


def clip(name: str = "hsk1-0027") -> np.ndarray:
    return np.concatenate(list(file_chunks(CLIPS / f"{name}.mp3")))


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# ---- audio -------------------------------------------------------------------------------------------------------
def test_file_decoding_matches_faster_whisper():
    from faster_whisper.audio import decode_audio

    ours = clip()
    ref = decode_audio(str(CLIPS / "hsk1-0027.mp3"))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 2 / 32768  # theirs goes through int16, ours stays float: one LSB


def test_chunks_are_a_tenth_of_a_second_and_lose_nothing():
    chunks = list(file_chunks(CLIPS / "hsk3-0622.mp3"))
    assert all(c.size == 1600 for c in chunks[:-1]) and 0 < chunks[-1].size <= 1600
    assert np.array_equal(np.concatenate(chunks), clip("hsk3-0622"))


def test_raw_pcm_is_resampled_and_downmixed(tmp_path):
    speech = clip()
    s16 = (speech * 32767).astype("<i2").tobytes()
    same = np.concatenate(list(pcm_chunks(io.BytesIO(s16), rate=16000)))
    assert same.shape == speech.shape and np.abs(same - speech).max() < 1e-4
    # 8 kHz stereo float: half the samples, two channels; resampled back it keeps the length and the signal
    stereo = np.stack([speech[::2], speech[::2]], axis=1).astype("<f4").tobytes()
    up = np.concatenate(list(pcm_chunks(io.BytesIO(stereo), rate=8000, fmt="f32le", channels=2)))
    assert abs(up.size - speech.size) <= 16
    n = min(up.size, speech.size)
    assert np.corrcoef(up[:n], speech[:n])[0, 1] > 0.95
    # a stream cut in the middle of a sample frame keeps the whole frames
    odd = np.concatenate(list(pcm_chunks(io.BytesIO(s16[:-1]), rate=16000)))
    assert odd.size == speech.size - 1


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 100}, "sample rate 100 Hz is out of range"),
    ({"rate": 10_000_000}, "out of range"),
    ({"fmt": "mulaw"}, "PCM format 'mulaw'"),
    ({"channels": 0}, "channels must be 1 to 8"),
])
def test_bad_pcm_parameters_are_named(kwargs, message):
    with pytest.raises(AudioError, match=message):
        pcm_chunks(io.BytesIO(b"\0" * 100), **kwargs)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "notes.mp3").write_text("this is not audio\n" * 50)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    cases = {"missing.wav": "no such file", "empty.mp3": "the file is empty", "notes.mp3": "not an audio file",
             "image.png": "not an audio file|no audio stream", "": "is a folder"}
    for name, message in cases.items():
        with pytest.raises(AudioError, match=message) as info:
            list(file_chunks(tmp_path / name))
        assert str(tmp_path / name) in str(info.value)


def test_a_truncated_file_decodes_what_it_has(tmp_path):
    whole = (CLIPS / "hsk1-0027.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(whole[:len(whole) // 2])
    samples = np.concatenate(list(file_chunks(tmp_path / "cut.mp3")))
    assert 0.3 * clip().size < samples.size < 0.7 * clip().size


def test_wav_at_another_rate_is_resampled(tmp_path):
    speech = clip()
    path = write_wav(tmp_path / "8k.wav", speech[::2], rate=8000)
    back = np.concatenate(list(file_chunks(path)))
    assert abs(back.size - speech.size) <= 16


def test_paced_releases_chunks_in_real_time():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    chunks = [np.zeros(1600, np.float32)] * 5
    out = []
    for c in paced(chunks, clock=lambda: now[0], sleep=sleep):
        out.append(now[0])
    assert out == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    now[0], slept[:] = 0.0, []
    list(paced(chunks, speed=2.0, clock=lambda: now[0], sleep=sleep))
    assert now[0] == pytest.approx(0.25)


# ---- voice activity ------------------------------------------------------------------------------------------------
def speech_with_pauses() -> np.ndarray:
    silence = np.zeros(16000, dtype=np.float32)
    audio = np.concatenate([silence, clip("hsk1-0027"), silence, clip("hsk4-0671"), silence[:8000]])
    return audio[:audio.size // FRAME * FRAME]


def test_streaming_vad_equals_faster_whispers_whole_file_pass():
    from faster_whisper.vad import get_vad_model

    audio = speech_with_pauses()
    reference = get_vad_model()(audio).reshape(-1)
    stream, rng, got, i = SileroStream(), np.random.default_rng(0), [], 0
    while i < audio.size:  # pieces of random sizes, most not a whole number of frames
        n = int(rng.integers(1, 4000))
        got.append(stream.feed(audio[i:i + n]))
        i += n
    assert np.array_equal(np.concatenate(got), reference)


def test_utterances_equal_faster_whispers_speech_timestamps():
    from faster_whisper.vad import VadOptions as TheirOptions
    from faster_whisper.vad import get_speech_timestamps

    audio = speech_with_pauses()
    ours = SpeechDetector(VadOptions(min_speech=0.0))
    found = ours.feed(audio) + ours.flush()
    theirs = get_speech_timestamps(audio, TheirOptions(threshold=0.5, neg_threshold=0.35, min_silence_duration_ms=400,
                                                       speech_pad_ms=0))
    assert [(u.start, u.end) for u in found] == [(t["start"], t["end"]) for t in theirs]
    assert len(found) == 2


def test_pause_is_announced_before_the_end_and_long_speech_is_cut():
    audio = speech_with_pauses()
    det = SpeechDetector()
    pauses, ends = [], []
    for i in range(0, audio.size, 1600):
        ends += det.feed(audio[i:i + 1600])
        if det.pause_at is not None and (not pauses or pauses[-1] != det.pause_at):
            pauses.append(det.pause_at)
    assert [u.end for u in ends] == [p for p in pauses if p in {u.end for u in ends}]
    assert all(any(p == u.end for p in pauses) for u in ends)  # every end was a pause first
    long = np.concatenate([clip("hsk1-0027")] * 4)
    cut = SpeechDetector(VadOptions(max_speech=3.0))
    pieces = cut.feed(long) + cut.flush()
    assert len(pieces) >= 3 and all(p.end - p.start <= 3.0 * 16000 + FRAME for p in pieces)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]) if b.start - a.end < FRAME)


def test_silence_and_noise_hold_no_speech():
    det = SpeechDetector()
    assert det.feed(np.zeros(48000, np.float32)) == [] and det.flush() == []
    rng = np.random.default_rng(1)
    det = SpeechDetector()
    found = det.feed(rng.normal(0, 0.05, 48000).astype(np.float32)) + det.flush()
    assert sum(u.end - u.start for u in found) < 0.5 * 48000



class CountingASR:
    """Stands in for Whisper where only the captioner's bookkeeping is under test: one fixed hypothesis."""

    language = "zh"

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, audio: np.ndarray, prefix: list[int] | None = None) -> Hypothesis:
        self.calls += 1
        return Hypothesis(tokens=[1, 2, 3], text="你好")

    def complete_prefix(self, tokens: list[int]) -> list[int]:
        return tokens

    def text_of(self, tokens: list[int]) -> str:
        return "你好"[:len(tokens)]


@pytest.mark.parametrize("tail_seconds", [0.0, 2.0])
def test_a_dropped_burst_is_forgotten_and_the_live_stream_ends(tail_seconds):
    """Speech the detector drops as too short (here: everything, min_speech 30 s) leaves no utterance in progress:
    the live loop ends at the end of the stream (it used to transcribe the dropped span forever)."""
    audio = np.concatenate([clip("hsk1-0027"), np.zeros(int(tail_seconds * 16000), np.float32)])
    asr = CountingASR()
    captioner = Captioner(asr, None, vad=VadOptions(min_speech=30.0))
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(captioner.captions(
        (audio[i:i + 1600] for i in range(0, audio.size, 1600)), live=True)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the live captioner did not end"
    assert [c for c in out if c.final] == []
    assert captioner.active is None


# ---- agreement, hallucination guard -----------------------------------------------------------------------------
def test_local_agreement():
    assert common_tokens([1, 2, 3, 4], [1, 2, 5]) == [1, 2]
    assert common_text("My mom is a teacher.", "My mom is a teacher, my dad") == "My mom is a"
    assert common_text("He works", "He works in Beijing.") == "He works"
    assert common_text("He wor", "He works in Beijing.") == "He"  # a cut word is not agreed on
    assert common_text("我妈妈是老师", "我妈妈是老") == "我妈妈是老"
    assert units("我是 ok, fine") == ["我", "是", " ok,", " fine"]


def test_repetition_is_recognised():
    assert repeats_itself([5, 6, 7, 5, 6, 7])
    assert repeats_itself([1, 2, 9, 9, 8, 9, 9, 8])
    assert not repeats_itself([1, 2, 3, 4, 5, 6])
    assert repeats_itself([1], text="今天是我的生日" * 5)


# ---- outputs -----------------------------------------------------------------------------------------------------
def caption(i, start, end, source, text, final=True, **kw) -> Caption:
    return Caption(index=i, start=start, end=end, source=source, text=text, final=final, **kw)


def test_srt_and_jsonl(tmp_path):
    assert srt_time(3723.4567) == "01:02:03,457" and srt_time(-1) == "00:00:00,000"
    srt, jsonl = SrtWriter(tmp_path / "a.srt"), JsonlWriter(tmp_path / "a.jsonl")
    for c in [caption(1, 0.384, 2.432, "我妈妈是老师", "My mom is a teacher."),
              caption(2, 3.0, 3.9, "他在", "He is", final=False),
              caption(2, 3.0, 3.1, "他在北京", "He is in Beijing."), caption(3, 5.0, 6.0, "", "")]:
        srt.add(c)
        jsonl.add(c)
    srt.close()
    jsonl.close()
    assert (tmp_path / "a.srt").read_text(encoding="utf-8") == (
        "1\n00:00:00,384 --> 00:00:02,432\nMy mom is a teacher.\n我妈妈是老师\n\n"
        "2\n00:00:03,000 --> 00:00:03,500\nHe is in Beijing.\n他在北京\n\n")
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == [1, 2, 3] and all(r["final"] for r in rows)
    assert rows[0] == {"index": 1, "start": 0.384, "end": 2.432, "source": "我妈妈是老师", "text": "My mom is a teacher.",
                       "final": True, "source_fixed": "", "text_fixed": "", "latency": None}


def test_terminal_view_redraws_on_a_tty_and_prints_lines_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    view = TerminalView(tty)
    view.add(caption(1, 0, 1, "我妈妈", "My mom", final=False, text_fixed="My"))
    view.add(caption(1, 0, 2, "我妈妈是老师", "My mom is a teacher."))
    view.close()
    out = tty.getvalue()
    assert "\x1b[1mMy\x1b[0m\x1b[90m mom\x1b[0m" in out  # fixed bright, the rest grey
    assert out.count("\x1b[1A\x1b[2K") == 2  # the two partial lines erased before the final ones
    assert out.endswith("\x1b[1mMy mom is a teacher.\x1b[0m\n")
    pipe = io.StringIO()
    view = TerminalView(pipe)
    view.add(caption(1, 0, 1, "我妈妈", "My mom", final=False))
    view.add(caption(1, 0, 2, "我妈妈是老师", "My mom is a teacher."))
    assert pipe.getvalue() == "My mom is a teacher.\n"


def test_long_lines_are_cut_to_the_terminal_width_in_columns():
    """Chinese characters take two columns: a line cut by character count would wrap, and the redraw (which
    erases the lines it drew) would leave the wrapped rows behind."""
    from qwenkit.apps.translate.outputs import _columns, _fit, _fit_styled

    assert _columns("我妈妈 is") == 9
    cut = _fit("我妈妈是老师，我爸爸是医生。", 20)
    assert cut == "…师，我爸爸是医生。" and _columns(cut) <= 20
    assert _fit("short", 20) == "short" and _fit("我" * 10, 20) == "我" * 10
    styled = _fit_styled("我妈妈是老师，", "我爸爸是医生。", 20)
    assert styled == "…\x1b[1m师，\x1b[0m\x1b[90m我爸爸是医生。\x1b[0m"
    assert _fit_styled("My", " mom", 20) == "\x1b[1mMy\x1b[0m\x1b[90m mom\x1b[0m"


def test_scoring_assigns_captions_to_clips():
    spans = [(0.0, 2.0), (3.0, 5.0)]
    caps = [caption(1, 0.1, 1.0, "我妈", "My"), caption(2, 1.1, 2.2, "妈", "mom"), caption(3, 3.2, 4.0, "他", "He"),
            caption(4, 9.0, 9.5, "噪", "noise"), caption(5, 3.0, 4.0, "x", "y", final=False)]
    groups = assign(caps, spans)
    assert [[c.index for c in g] for g in groups] == [[1, 2], [3]]
    assert normalize_zh("我們，好！ OK") == "我们好OK"
    assert char_error_rate(["我妈妈是老师。"], ["我妈妈是老师"]) == 0.0
    assert char_error_rate(["我妈妈是老师"], ["我妈是老"]) == pytest.approx(2 / 6)


# ---- glossary and translator -------------------------------------------------------------------------------------
def test_glossary_files(tmp_path):
    (tmp_path / "g.tsv").write_text("# names\n王小明\tWang Xiaoming\n\n通义 = Tongyi\n", encoding="utf-8")
    assert read_glossary(tmp_path / "g.tsv") == [Term("王小明", "Wang Xiaoming"), Term("通义", "Tongyi")]
    (tmp_path / "g.json").write_text('{"千问": "Qwen"}', encoding="utf-8")
    assert read_glossary(tmp_path / "g.json") == [Term("千问", "Qwen")]
    (tmp_path / "bad.tsv").write_text("王小明\tWang\nno separator here\n", encoding="utf-8")
    with pytest.raises(BadData, match=r"bad.tsv:2: expected"):
        read_glossary(tmp_path / "bad.tsv")
    with pytest.raises(BadData, match="cannot read"):
        read_glossary(tmp_path / "missing.tsv")
    (tmp_path / "bad.json").write_text('{"a": 3}', encoding="utf-8")
    with pytest.raises(BadData, match="non-empty target strings"):
        read_glossary(tmp_path / "bad.json")


class RecordingChat:
    """A chat client that records requests and answers from a list (an OpenAI chat.completion dict each)."""

    def __init__(self, *answers: str):
        self.answers, self.requests = list(answers), []

    def chat(self, messages, stream=False, **params):
        self.requests.append((messages, params))
        return {"choices": [{"message": {"role": "assistant", "content": self.answers.pop(0)}}]}


def test_translator_requests():
    chat = RecordingChat("My mom is a teacher.\n\nNote: 妈妈 means mom.", " a worker.", '"Hello."')
    t = Translator(chat, "zh", "en", glossary=[Term("王小明", "Wang Xiaoming")])
    assert t.translate("我妈妈是老师。") == "My mom is a teacher."
    messages, params = chat.requests[0]
    # the system prompt, the pair's worked examples (a question among them), then the text framed the same way
    assert messages[0] == {"role": "system", "content": "Translate the user's Mandarin Chinese into natural English. "
                           "Reply with the translation only."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * len(EXAMPLES[("zh", "en")]) + ["user"]
    assert messages[-1] == {"role": "user", "content": "Translate into English:\n我妈妈是老师。"}
    assert any(m["content"].endswith("?") for m in messages if m["role"] == "assistant")
    assert params["temperature"] == 0.0 and params["stop"] == ["\n\n"] and "continue_final_message" not in params
    assert t.translate("王小明是工人。", prefix="Wang Xiaoming is") == "Wang Xiaoming is a worker."
    messages, params = chat.requests[1]
    assert "王小明 = Wang Xiaoming" in messages[0]["content"]
    assert messages[-1] == {"role": "assistant", "content": "Wang Xiaoming is"}
    assert params["add_generation_prompt"] is False and params["continue_final_message"] is True
    assert t.translate("你好") == "Hello."
    assert t.translate("   ") == "" and len(chat.requests) == 3  # nothing to translate: no request
    assert Translator(chat, "en", "zh").system == "把用户的英文翻译成自然的简体中文。只输出译文。"
    assert "natural Traditional Chinese" in Translator(chat, "en", "yue").system
    with pytest.raises(BadData, match="unknown language code 'xx'"):
        Translator(chat, "xx", "en")


def test_a_question_answered_instead_of_translated_is_asked_again_begun_as_a_question():
    chat = RecordingChat("Your face is red.", " is your face so red?", "Yes, I have been there.", "Have you been?")
    t = Translator(chat, "zh", "en")
    assert t.translate("你的脸怎么这么红？") == "Why is your face so red?" and t.retries == 1
    messages, params = chat.requests[1]
    assert messages[-1] == {"role": "assistant", "content": "Why"} and params["continue_final_message"] is True
    assert QUESTION_HINT in messages[0]["content"]
    # a yes/no question: asked again without an opening; kept only when the second answer is a question
    assert t.translate("你去过吗？") == "Have you been?" and chat.requests[3][0][-1]["role"] == "user"


def test_a_number_left_out_is_asked_again_told_which_numbers_to_keep():
    chat = RecordingChat("The meeting starts in the afternoon.", "The meeting starts at 3 pm.", "I have two books.",
                         "He is happy.", "He is happy.")
    t = Translator(chat, "zh", "en")
    assert t.translate("会议下午三点开始。") == "The meeting starts at 3 pm." and t.retries == 1
    assert "Keep every number: 三 = 3." in chat.requests[1][0][0]["content"]
    assert t.translate("我有两本书。") == "I have two books." and t.retries == 1  # "two" carries 两 over
    # a second answer no better than the first: the first is kept
    chat = RecordingChat("He bought books.", "He bought some books.")
    t = Translator(chat, "zh", "en")
    assert t.translate("他买了二十五本书。") == "He bought books." and t.retries == 1


@pytest.mark.parametrize("text, numbers", [
    ("会议下午三点开始。", [3]), ("我住三号楼二单元。", [3, 2]), ("他二十五岁。", [25]),
    ("一万五千人参加了比赛。", [15000]), ("二〇二六年我去北京。", [2026]), ("他考了98.5分。", [98.5]),
    ("百分之五十的人同意。", [50]), ("我买了两本书。", [2]),
    # words that merely contain a numeral, a lone 一, and guesses ("three or four hundred") are not checked
    ("我们一起去吧。", []), ("他十分高兴。", []), ("我有一个问题。", []), ("这件衣服三四百块。", []),
    ("来了十几个人。", []), ("他再三感谢我们。", []), ("这件外套打八折。", []),
])
def test_numbers_a_translation_must_carry_over(text, numbers):
    assert [n.value for n in numbers_in(text)] == numbers


def test_numbers_are_found_in_any_english_form():
    assert not missing_numbers("会议下午三点开始。", "The meeting starts at three.")
    assert not missing_numbers("会议下午三点开始。", "The meeting starts at 3:00 pm.")
    assert not missing_numbers("三月八日是妇女节。", "March 8th is Women's Day.")
    assert not missing_numbers("星期三我有课。", "I have class on Wednesday.")
    assert not missing_numbers("他二十五岁。", "He is twenty-five years old.")
    assert not missing_numbers("一万五千人参加了比赛。", "15,000 people took part in the race.")
    assert [n.text for n in missing_numbers("我住三号楼二单元。", "I live in Building 3.")] == ["二"]
    assert missing_numbers("他二十五岁。", "He is 250 years old.")  # a number inside another is not it


@pytest.mark.parametrize("text, names", [
    ("王小明是我的朋友。", [("王小明", "Wang Xiaoming")]), ("张东和李明去北京了。", [("张东", "Zhang Dong"), ("李明", "Li Ming")]),
    ("小王明天不来了。", [("小王", "Xiao Wang")]), ("李老师很好。", [("李老师", "Teacher Li")]),
    ("李主任是一位专家。", [("李主任", "Director Li")]), ("王先生和夫人都来了。", [("王先生", "Mr. Wang")]),
    # everyday words the tagger calls names, a measure word, a name-like phrase: none is a person
    ("谢谢你！", []), ("我明白了。", []), ("凭这张卡可以进去。", []), ("他近视，要戴眼镜。", []), ("金和银都很贵。", []),
    ("到路口向左转。", []), ("汤里有一块骨头。", []),
])
def test_people_s_names_and_their_pinyin(text, names):
    assert list(find_names(text)) == names


def test_a_name_found_in_the_text_is_given_beside_it_and_kept():
    chat = RecordingChat("He is my friend.", " is my friend.")
    t = Translator(chat, "zh", "en")
    assert t.translate("王小明是我的朋友。") == "Wang Xiaoming is my friend." and t.retries == 1
    first, again = chat.requests[0][0], chat.requests[1][0]
    assert first[-1]["content"] == "Translate into English, with 王小明 = Wang Xiaoming:\n王小明是我的朋友。"
    assert again[-1] == {"role": "assistant", "content": "Wang Xiaoming"}  # begun with the name, as the text is
    # the user's glossary wins over the name's pinyin, and into Chinese no name is looked for
    chat = RecordingChat("Xiaoming is my friend.")
    t = Translator(chat, "zh", "en", glossary=[Term("小明", "Xiaoming")])
    assert t.translate("王小明是我的朋友。") == "Xiaoming is my friend." and t.retries == 0
    assert t.terms("王小明是我的朋友。") == [Term("小明", "Xiaoming")]
    assert Translator(chat, "en", "zh").terms("王小明") == []


def test_question_openers():
    assert question_opener("他是什么样的人？") == "What kind of"
    assert question_opener("你为什么这么高兴？") == "Why" and question_opener("这个字怎么写？") == "How"
    assert question_opener("他究竟去哪儿了？") == "Where" and question_opener("你喝茶吗？") == ""


def test_a_copied_chinese_term_is_asked_again_with_its_tokens_banned():
    class Vocabulary:  # stands in for a Qwen tokenizer: the ids it gives are what the bias names
        def encode(self, text):
            return [1000 + ord(c) % 97 for c in text]

    chat = RecordingChat("He主持 the meeting.", " chaired the meeting.", "他主持了会议。")
    t = Translator(chat, "zh", "en", vocabulary=Vocabulary())
    assert t.translate("他主持了会议。") == "He chaired the meeting." and t.retries == 1
    messages, params = chat.requests[1]
    assert messages[-1] == {"role": "assistant", "content": "He"} and params["continue_final_message"] is True
    banned = {str(i) for form in ("主持", " 主持") for i in Vocabulary().encode(form)}
    assert set(params["logit_bias"]) == banned and set(params["logit_bias"].values()) == {-100.0}
    assert "logit_bias" not in chat.requests[0][1]
    into_chinese = Translator(chat, "en", "zh", vocabulary=Vocabulary())  # Chinese output is not a leak there
    assert into_chinese.translate("He chaired the meeting.") == "他主持了会议。" and into_chinese.retries == 0


def test_clean_keeps_the_fixed_prefix():
    assert clean("“Hello there.”") == "Hello there."
    assert clean("He is\nsomething else", keep="He is") == "He is"
    assert clean("\n\n  Two   spaces  ") == "Two spaces"


# ---- the web page's event stream ---------------------------------------------------------------------------------
def test_caption_server_streams_history_then_live_events():
    from qwenkit.apps.translate.web import CaptionServer

    server = CaptionServer("127.0.0.1", 0)
    try:
        server.add(caption(1, 0, 1, "我", "I"))
        page = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert "EventSource" in page
        got: list[str] = []

        def listen():
            with urllib.request.urlopen(server.url + "events", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                for raw in r:
                    got.append(raw.decode())
                    if raw.startswith(b"event: end"):
                        return

        reader = threading.Thread(target=listen)
        reader.start()
        deadline = time.monotonic() + 5
        while not any('"index": 1' in line for line in got) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.add(caption(2, 2, 3, "他", "He", final=False))
        server.add(caption(2, 2, 3, "他在", "He is."))
        assert json.loads(urllib.request.urlopen(server.url + "captions", timeout=5).read())[1]["text"] == "He is."
    finally:
        server.close()
    reader.join(10)
    data = [json.loads(line[6:]) for line in got if line.startswith("data: {") and line != "data: {}\n"]
    assert [(d["index"], d["final"]) for d in data] == [(1, True), (2, False), (2, True)]
    assert "event: end\n" in got
    ids = [int(line[4:]) for line in got if line.startswith("id: ")]
    assert ids == sorted(ids) and len(ids) == 3


def test_a_page_too_slow_to_keep_up_is_told_to_reconnect():
    """A subscriber whose queue fills (its page stopped reading) is dropped with word to reconnect, which its
    EventSource does with Last-Event-ID, getting the history it missed; the captions never wait for it."""
    from qwenkit.apps.translate.web import CaptionServer

    server = CaptionServer("127.0.0.1", 0)
    try:
        q, _ = server._subscribe(0)
        for i in range(1001):
            server.add(caption(i, i, i + 1, "我", "I"))
        assert q not in server.subscribers
        assert list(q.queue) == [("reconnect", None)]
    finally:
        server.close()


def test_captions_say_when_the_on_device_model_translates(caplog):
    import qwenkit
    from qwenkit.route.backends import BackendError
    from qwenkit.route.config import RouteConfig
    from qwenkit.route.router import Router
    from tests.unit.test_route_config import Scripted, chunk

    hosted = Scripted("hosted", [BackendError("hosted", "HTTP 503", 503)])
    device = Scripted("device", [chunk("Hello."), chunk(finish="stop")], remote=False)
    with qwenkit.Client(Router(RouteConfig([hosted.config, device.config], probe_interval=3600),
                               [hosted, device])) as client, caplog.at_level("WARNING", logger="qwenkit.translate"):
        t = Translator(client, "zh", "en")
        assert t.translate("你好。") == "Hello." and t.translate("你好。") == "Hello."
    said = [r.getMessage() for r in caplog.records if r.name == "qwenkit.translate"]
    assert said == ["the hosted model did not answer: the on-device model is answering (slower)"]


def test_the_held_out_hsk_set_is_apart_from_the_clips_and_the_tuning_data():
    """benchmarks/data/hsk_heldout.json: 50 ids per HSK level, none of them one of the 180 clips, and
    scripts/hsk_tune_data.py reads the same file to leave them out of the tuning data."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ids = json.loads((root / "benchmarks" / "data" / "hsk_heldout.json").read_text(encoding="utf-8"))["ids"]
    clips_file = root.parent / "shared" / "data" / "hsk-audio" / "sentences.jsonl"
    if clips_file.exists():
        clip_ids = {json.loads(line)["id"] for line in clips_file.read_text(encoding="utf-8").splitlines() if line}
        assert not clip_ids & set(ids)
    assert len(set(ids)) == len(ids) == 300
    assert sorted({i.split("-")[0] for i in ids}) == [f"hsk{level}" for level in range(1, 7)]
    assert all(sum(i.startswith(f"hsk{level}-") for i in ids) == 50 for level in range(1, 7))
    assert "hsk_heldout.json" in (root / "scripts" / "hsk_tune_data.py").read_text(encoding="utf-8")
