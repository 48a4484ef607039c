"""Qwen's byte-level BPE tokenizer, from a Hugging Face folder or from GGUF metadata, and an incremental decoder.

Both constructors produce a `tokenizers.Tokenizer` shaped like Qwen's own tokenizer.json: NFC normaliser, the qwen2
split regex (every digit on its own) followed by byte-level mapping, BPE without unknown token, byte-level decoder,
and the control / user-defined tokens registered as added tokens so that `<|im_start|>` or `<tool_call>` written
in a text stay whole. `encode` never adds a BOS (Qwen adds none).

Note on GGUF parity: transformers' GGUF loader builds the same tokenizer but without the NFC normaliser that Qwen's
tokenizer.json has; we keep NFC (it is how the model was trained), so the two differ only on non-NFC input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from qwenkit.errors import BadCheckpoint, BadRequest, UnsupportedModel

__all__ = ["Tokenizer", "IncrementalDecoder", "QWEN2_SPLIT_REGEX"]

# The split of Qwen2/2.5/3's tokenizer.json: contractions, letters with one leading non-letter, ONE digit at a
# time, punctuation runs, newline runs, whitespace.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 also keeps combining marks (\p{M}) with letters.
QWEN35_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values (llama.cpp names) whose vocabularies were learned with these splits.
_GGUF_PRE_SPLITS = {
    "qwen2": QWEN2_SPLIT_REGEX,
    "deepseek-r1-qwen": QWEN2_SPLIT_REGEX,
    "qwen35": QWEN35_SPLIT_REGEX,
}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Names Qwen uses for "end of document"; used as a fallback pad/eos and as an extra stop token.
_ENDOFTEXT = "<|endoftext|>"
_IM_END = "<|im_end|>"


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse table: printable character -> byte."""
    return {c: b for b, c in _byte_alphabet().items()}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A Qwen tokenizer: `encode(text) -> ids` (no BOS), `decode(ids) -> text`, and the token facts the engine needs.

    vocab_size counts every id the tokenizer knows (BPE vocabulary plus added tokens); the model's embedding may
    have more rows.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        source_name: str = "<tokenizer>",
    ) -> None:
        self._tok = backend
        self.source_name = source_name
        self.chat_template: str | None = chat_template

        def _id(token: str | None, what: str) -> int | None:
            if token is None:
                return None
            tid = backend.token_to_id(token)
            if tid is None:
                raise BadCheckpoint(f"{source_name}: {what} {token!r} is not in the vocabulary")
            return tid

        self.eos_token: str = eos_token
        self.eos_token_id: int = _id(eos_token, "eos token")  # type: ignore[assignment]
        self.bos_token: str | None = bos_token
        self.bos_token_id: int | None = _id(bos_token, "bos token")
        if pad_token is None:
            pad_token = _ENDOFTEXT if backend.token_to_id(_ENDOFTEXT) is not None else eos_token
        self.pad_token: str = pad_token
        self.pad_token_id: int = _id(pad_token, "pad token")  # type: ignore[assignment]

        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.added_ids: frozenset[int] = frozenset(added)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Qwen stops on <|im_end|> and <|endoftext|> whatever the configured eos is.
        stops = {self.eos_token_id}
        for name in (_IM_END, _ENDOFTEXT):
            tid = backend.token_to_id(name)
            if tid is not None and tid in self.special_ids:
                stops.add(tid)
        self.stop_ids: frozenset[int] = frozenset(stops)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja) from a Hugging Face model folder."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise BadCheckpoint(f"{folder}: no tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise BadCheckpoint(f"{tj}: cannot be read as a tokenizer ({e})") from e

        config: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadCheckpoint(f"{cfg_path}: not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise BadCheckpoint(f"{cfg_path}: expected a JSON object")

        # Tokens the config declares that tokenizer.json might lack (older exports).
        decoder = config.get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            missing: list[AddedToken] = []
            for entry in decoder.values():
                content = _token_content(entry)
                if content is None or backend.token_to_id(content) is not None:
                    continue
                e = entry if isinstance(entry, dict) else {}
                missing.append(
                    AddedToken(
                        content,
                        single_word=bool(e.get("single_word", False)),
                        lstrip=bool(e.get("lstrip", False)),
                        rstrip=bool(e.get("rstrip", False)),
                        normalized=bool(e.get("normalized", False)),
                        special=bool(e.get("special", False)),
                    )
                )
            if missing:
                backend.add_tokens(missing)

        template = cls._read_chat_template(folder, config)
        eos = _token_content(config.get("eos_token"))
        if eos is None:
            eos = next((t for t in (_IM_END, _ENDOFTEXT) if backend.token_to_id(t) is not None), None)
        if eos is None:
            raise BadCheckpoint(f"{folder}: no eos_token in tokenizer_config.json and no <|endoftext|> token")
        return cls(
            backend,
            eos_token=eos,
            bos_token=_token_content(config.get("bos_token")),
            pad_token=_token_content(config.get("pad_token")),
            chat_template=template,
            source_name=str(folder),
        )

    @staticmethod
    def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():  # newer transformers save the template on its own; it wins over the config entry
            try:
                return jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise BadCheckpoint(f"{jinja}: unreadable ({e})") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        cj = folder / "chat_template.json"  # processor-style folders
        if template is None and cj.is_file():
            try:
                template = json.loads(cj.read_text(encoding="utf-8")).get("chat_template")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise BadCheckpoint(f"{cj}: not valid JSON ({e})") from e
        return template if isinstance(template, str) else None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source_name: str) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata (byte-level BPE, qwen2 split)."""

        def bad(msg: str) -> BadCheckpoint:
            return BadCheckpoint(f"{source_name}: {msg}")

        model_type = meta.get("tokenizer.ggml.model", "gpt2")
        if model_type != "gpt2":
            raise UnsupportedModel(
                f"{source_name}: tokenizer.ggml.model is {model_type!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        pre = meta.get("tokenizer.ggml.pre", "qwen2")
        split = _GGUF_PRE_SPLITS.get(pre) if isinstance(pre, str) else None
        if split is None:
            raise UnsupportedModel(f"{source_name}: tokenizer.ggml.pre {pre!r} is not a Qwen pre-tokenizer")

        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise bad("missing tokenizer.ggml.tokens")
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise bad("tokenizer.ggml.tokens is not a list of strings")
        tokens = list(tokens)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise bad("tokenizer.ggml.tokens is empty or holds non-strings")

        merges_raw = meta.get("tokenizer.ggml.merges")
        if merges_raw is None:
            raise bad("missing tokenizer.ggml.merges")
        if isinstance(merges_raw, (str, bytes)) or not isinstance(merges_raw, Iterable):
            raise bad("tokenizer.ggml.merges is not a list of strings")
        merges: list[tuple[str, str]] = []
        for i, m in enumerate(merges_raw):
            parts = m.split(" ") if isinstance(m, str) else None
            if parts is None or len(parts) != 2 or not parts[0] or not parts[1]:
                raise bad(f"tokenizer.ggml.merges[{i}] = {m!r} is not of the form 'left right'")
            merges.append((parts[0], parts[1]))

        types_raw = meta.get("tokenizer.ggml.token_type")
        if types_raw is None:
            token_types: list[int] = []
        else:
            try:
                token_types = [int(t) for t in types_raw]
            except (TypeError, ValueError) as e:
                raise bad(f"tokenizer.ggml.token_type is not a list of integers ({e})") from e
            if len(token_types) != len(tokens):
                raise bad(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")

        # Like transformers: a token spelled outside the byte alphabet is respelled byte by byte.
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {
            (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        try:
            bpe = models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        except Exception as e:
            raise bad(f"vocabulary and merges do not form a BPE model ({e})") from e
        backend = _HFTokenizer(bpe)
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()

        # Control tokens (type 3) become special added tokens, user-defined ones (type 4, e.g. <tool_call>, <think>)
        # plain added tokens. A "control" token spelled outside the byte alphabet is a llama.cpp mislabel: skipped.
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_CONTROL and set(t) <= alphabet
        ]
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_USER_DEFINED and t in vocab
        ]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)

        def token_at(key: str) -> str | None:
            tid = meta.get(key)
            if tid is None:
                return None
            try:
                tid = int(tid)
            except (TypeError, ValueError) as e:
                raise bad(f"{key} = {tid!r} is not an integer") from e
            if not 0 <= tid < len(tokens):
                raise bad(f"{key} = {tid} is outside the vocabulary of {len(tokens)} tokens")
            return tokens[tid]

        eos = token_at("tokenizer.ggml.eos_token_id")
        if eos is None:
            eos = next((t for t in (_IM_END, _ENDOFTEXT) if backend.token_to_id(t) is not None), None)
            if eos is None:
                raise bad("missing tokenizer.ggml.eos_token_id")
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            eos_token=eos,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            chat_template=template if isinstance(template, str) else None,
            source_name=source_name,
        )

    # ------------------------------------------------------------------ use

    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (read-only use, please)."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) are recognised; no BOS."""
        if not isinstance(text, str):
            raise BadRequest(f"encode: expected a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a character cut in half) decodes to U+FFFD.

        Ids the tokenizer does not know (embedding rows past the vocabulary) decode to nothing, as in HF.
        """
        try:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError, ValueError) as e:
            raise BadRequest(f"decode: token ids must be non-negative integers ({e})") from e

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a byte-level BPE token may hold part of a UTF-8 character, which
        decode() would turn into U+FFFD); b"" for an id the tokenizer does not know."""
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            return b""
        if token_id in self.added_ids:
            return token.encode("utf-8")
        inverse = _byte_decoder()
        if all(c in inverse for c in token):
            return bytes(inverse[c] for c in token)
        return self.decode([token_id]).encode("utf-8")  # not a byte-level vocabulary

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source_name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


class IncrementalDecoder:
    """Turn a stream of token ids into text deltas that never end inside a UTF-8 character.

    Prefix-offset / read-offset scheme (vLLM's detokenize_incrementally, HF's TextStreamer): the text of
    ids[prefix:read] was already emitted; on each push decode ids[prefix:] and emit what lies beyond, unless it
    ends in U+FFFD (an incomplete character: hold it back). The concatenation of every push and flush() equals
    tokenizer.decode(all_ids, skip_special_tokens) exactly.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already emitted (context for the next decode)
        self._read = 0  # ids before _read have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character comes out as U+FFFD, like decode does)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0
