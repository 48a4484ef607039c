"""Our tokenizer from the real GGUF's metadata against transformers' tokenizer loaded from the same file.

transformers' GGUF loader rebuilds Qwen's tokenizer without the NFC normaliser that Qwen's own tokenizer.json has
(we keep it), so on text that is not already NFC the reference is transformers' tokenizer with NFC added, i.e.
exactly Qwen's tokenizer.json; on NFC text the two transformers variants agree and so must we.
"""

import unicodedata

import pytest

from qwenkit.text.tokenizer import IncrementalDecoder, Tokenizer
from tests.peers.gguf_meta import read_gguf_meta

pytestmark = [pytest.mark.real_weights, pytest.mark.peer]

NFD_SOURCES = ["Crème brûlée à Noël, Ångström, façade", "한국어 텍스트 정규화", "Ǆ ﬁ ｶ ① ü"]
CORPUS = [
    "我们明天早上九点在公司门口见面，然后一起去机场。",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've gone, I'M here.",
    "def f(x):\n\tif x:\n\t\treturn [i**2 for i in range(10)]\n    else:\n        return None  # done\n",
    "class A:\n    def __init__(self):\n        self.x = {'a': 1, \"b\": [1, 2]}\n\n\n\nprint(A().x)\n",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🧑‍💻 coder, 🇯🇵 flag, 😀😃😄",
    "1234567890 and 3.14159, 2024-01-01T12:00:00Z, 1e-9, ١٢٣ ٤٥٦, ½ ² ³",
    "a\n\n\nb   \n  \t \n trailing   ",
    "   leading spaces\r\n windows line\r\n\u00a0nbsp and zero\u200bwidth",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|endoftext|>',
    "not special: <|im_start  |> <|unknown|> <tool_call <|im_end|><|im_end|>",
    "日本語のテキスト、Русский текст, العربية, हिन्दी",
    "",
    " ",
    "\n",
] + NFD_SOURCES + [unicodedata.normalize("NFD", s) for s in NFD_SOURCES]


@pytest.fixture(scope="module")
def meta(default_gguf):
    return read_gguf_meta(default_gguf)


@pytest.fixture(scope="module")
def ours(meta, default_gguf):
    return Tokenizer.from_gguf_metadata(meta, default_gguf.name)


@pytest.fixture(scope="module")
def hf(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def hf_nfc(hf):
    """transformers' GGUF tokenizer plus the NFC normaliser of Qwen's tokenizer.json."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers

    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFC()
    return backend


def test_token_facts(ours, hf, meta):
    assert ours.vocab_size == len(hf) == 151936
    assert ours.eos_token_id == hf.eos_token_id == 151645
    assert ours.bos_token_id == hf.bos_token_id == 151643
    assert ours.pad_token_id == hf.pad_token_id == 151643
    assert ours.stop_ids == {151643, 151645}
    specials = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert ours.special_ids == specials and 151644 in specials and 151657 not in specials
    assert ours.token_to_id("<tool_call>") == 151657 and ours.token_to_id("</tool_call>") == 151658
    assert ours.token_to_id("<think>") is None  # Qwen2.5 has no think tokens
    assert ours.backend.get_vocab() == hf.get_vocab()
    assert ours.chat_template == meta["tokenizer.chat_template"]


def test_encode_parity(ours, hf, hf_nfc):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == hf_nfc.encode(text, add_special_tokens=False).ids, text
        assert ids == hf.encode(unicodedata.normalize("NFC", text), add_special_tokens=False), text
        if unicodedata.is_normalized("NFC", text):
            assert ids == hf.encode(text, add_special_tokens=False), text


def test_specific_encodings(ours):
    assert ours.encode("<|im_start|>user")[0] == 151644
    assert ours.encode("1234567890") == [ours.token_to_id(d) for d in "1234567890"]
    assert ours.encode("3.14159")[1] == ours.token_to_id(".")
    nfd = unicodedata.normalize("NFD", NFD_SOURCES[1])
    assert ours.encode(nfd) == ours.encode(NFD_SOURCES[1])


def test_decode_parity(ours, hf):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.decode([151644, 872, 151645], skip_special_tokens=True) == "user"


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder(ours, skip):
    held_back = 0
    everything = "".join(CORPUS)
    for ids in [ours.encode(t) for t in CORPUS] + [ours.encode(everything)]:
        dec = IncrementalDecoder(ours, skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids]
        held_back += pieces.count("")
        assert "".join(pieces) + dec.flush() == ours.decode(ids, skip_special_tokens=skip)
        assert not any(p.endswith("\ufffd") for p in pieces)
    assert held_back > 0  # emoji and rare CJK characters span several tokens


def test_incremental_decoder_split_emoji(ours):
    ids = ours.encode(" 🧑‍💻")
    assert len(ids) > 1
    dec = IncrementalDecoder(ours)
    out = [dec.push(i) for i in ids]
    assert "".join(out) == " 🧑‍💻" and "" in out


def test_from_hf_dir_matches(ours, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (151645, 151643, 151643)
    assert loaded.special_ids == ours.special_ids
    assert loaded.chat_template == ours.chat_template
    for text in CORPUS:
        if unicodedata.is_normalized("NFC", text):  # the saved tokenizer.json has transformers' (no NFC) normaliser
            assert loaded.encode(text) == ours.encode(text), text


def test_stream_parser_on_real_vocabulary(ours):
    from qwenkit.text.stream import ContentDelta, StreamParser, ToolCall

    reply = 'Let me look that up. 🔍\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    parser, dec = StreamParser(ours, seed=0), IncrementalDecoder(ours, skip_special_tokens=True)
    events = []
    for tid in ours.encode(reply) + [ours.eos_token_id]:
        if tid in ours.stop_ids:
            break
        events += parser.feed(tid, dec.push(tid))
    events += parser.feed(None, dec.flush()) + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Let me look that up. 🔍"
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "北京"}')
