"""Tokenizer and IncrementalDecoder on a tiny byte-level vocabulary (the real-vocabulary parity is in peers/)."""

import json
import random
import unicodedata

import pytest

from qwenkit.errors import BadCheckpoint, BadRequest
from qwenkit.text.tokenizer import IncrementalDecoder, Tokenizer
from tests.unit.test_stream_parser import tiny_meta, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_token_facts(tok):
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.bos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.special_ids == {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert tok.stop_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    assert tok.vocab_size == len(tiny_meta()["tokenizer.ggml.tokens"])
    assert tok.id_to_token(tok.token_to_id("<think>")) == "<think>"
    assert tok.token_to_id("no such token") is None


def test_encode_recognises_added_tokens_and_adds_no_bos(tok):
    ids = tok.encode("<|im_start|>user\nhello<|im_end|><think>x</think>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.bos_token_id not in ids
    assert tok.token_to_id("<|im_end|>") in ids and tok.token_to_id("<think>") in ids
    assert tok.token_to_id("hello") in ids  # merges apply
    assert tok.encode("") == []


def test_digits_split_and_nfc(tok):
    assert len(tok.encode("1234567890")) == 10
    nfd = unicodedata.normalize("NFD", "café Ångström")
    assert nfd != unicodedata.normalize("NFC", nfd)
    assert tok.encode(nfd) == tok.encode(unicodedata.normalize("NFC", nfd))


def test_decode(tok):
    text = "<|im_start|>héllo 👋 <think>x</think>\n\n  "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "héllo 👋 <think>x</think>\n\n  "
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(BadRequest):
        tok.decode([-1])


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder_matches_decode(tok, skip):
    rng = random.Random(0)
    texts = ["Hello 世界! 🧑‍💻👍🏽 \n\n\tx  ", "<|im_start|>a<|im_end|>é" * 3]
    cases = [tok.encode(t) for t in texts]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(300)]
    for ids in cases:
        dec = IncrementalDecoder(tok, skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        # no piece before the flush ends inside a character
        assert not any(p.endswith("\ufffd") for p in pieces[:-1] if p) or "\ufffd" in tok.decode(ids)


def test_token_bytes_are_exact_even_inside_a_character(tok):
    text = "a👋b <think>é"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    wave = tok.encode("👋")
    assert len(wave) > 1 and tok.token_bytes(wave[0]) == "👋".encode()[:1]  # one byte, not U+FFFD
    assert tok.token_bytes(tok.token_to_id("<think>")) == b"<think>"
    assert tok.token_bytes(10**9) == b""


def test_incremental_decoder_holds_partial_characters(tok):
    dec = IncrementalDecoder(tok)
    ids = tok.encode("a👋b")
    out = [dec.push(i) for i in ids]
    assert out == ["a", "", "", "", "👋", "b"]
    assert dec.flush() == ""


def _broken(**changes):
    meta = tiny_meta()
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize(
    "meta, words",
    [
        (_broken(**{"tokenizer.ggml.tokens": None}), "missing tokenizer.ggml.tokens"),
        (_broken(**{"tokenizer.ggml.tokens": []}), "tokens"),
        (_broken(**{"tokenizer.ggml.tokens": [1, 2]}), "tokens"),
        (_broken(**{"tokenizer.ggml.merges": None}), "missing tokenizer.ggml.merges"),
        (_broken(**{"tokenizer.ggml.merges": ["abc"]}), "merges[0]"),
        (_broken(**{"tokenizer.ggml.merges": ["a b c"]}), "merges[0]"),
        (_broken(**{"tokenizer.ggml.merges": [["a", "b"]]}), "merges[0]"),
        (_broken(**{"tokenizer.ggml.merges": ["zz qq"]}), "BPE"),
        (_broken(**{"tokenizer.ggml.token_type": [1, 2]}), "token_type"),
        (_broken(**{"tokenizer.ggml.eos_token_id": 10**7}), "eos_token_id"),
        (_broken(**{"tokenizer.ggml.model": "llama"}), "tokenizer.ggml.model"),
        (_broken(**{"tokenizer.ggml.pre": "gpt-4o"}), "tokenizer.ggml.pre"),
    ],
)
def test_malformed_metadata(meta, words):
    with pytest.raises(BadCheckpoint) as e:
        Tokenizer.from_gguf_metadata(meta, "broken.gguf")
    assert "broken.gguf" in str(e.value) and words in str(e.value)


def test_from_hf_dir(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": "old {{ messages }}",
        "added_tokens_decoder": {"999": {"content": "<extra>", "special": True}},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_hf_dir(tmp_path)
    text = "<|im_start|>user\nhello 1234 <extra>"
    assert hf.encode(text)[:-1] == tok.encode(text.replace(" <extra>", " "))
    assert hf.token_to_id("<extra>") in hf.special_ids
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, None)
    assert hf.chat_template == "old {{ messages }}"
    (tmp_path / "chat_template.jinja").write_text("new {{ messages }}")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "new {{ messages }}"


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(BadCheckpoint, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BadCheckpoint, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
