"""Constrained decoding: JSON output (response_format json_object / json_schema) and forced tool calls.

llguidance does the work: a grammar (Lark with inline `%json` schemas) is compiled once against the tokenizer, and
a matcher per sequence computes, before every token, the bitmask of tokens that keep the output inside the grammar.

    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, stop_ids)   # once per model (1-3 s)
    grammar = compiler.json(schema)                                            # cached per schema
    constraint = grammar.constraint()                                          # one per sequence
    Sampler(params, vocab, prompt_ids, constraint)                             # calls mask() / accept()

Conventions the server relies on:
- the model's stop ids (`<|im_end|>`, `<|endoftext|>`) are allowed exactly where the grammar may end, so a
  constrained answer ends like any other (finish_reason "stop", or "tool_calls" once the parser saw a call);
- ids the model can emit but the tokenizer does not define (embedding rows past the vocabulary, and the
  `[PAD<id>]` fillers llama.cpp writes for them in GGUF files) are always forbidden;
- tool calls use Qwen's own format, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, with the tags
  as their single added tokens (`<[id]>` in the grammar), so text.stream.StreamParser sees them by id;
- with thinking=True (Qwen3 thinking on) free reasoning ending in `</think>` comes first; the constraint applies
  after it.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np
import torch

from qwenkit.errors import BadRequest

__all__ = ["GrammarCompiler", "Grammar", "Constraint"]

# JSON answers may be pretty-printed (models like to), but each gap takes at most this much whitespace: with
# unbounded whitespace a small model can emit newlines until max_tokens.
_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"
# Tool calls are written exactly as Qwen's template writes them (Python json.dumps style): what the model was
# trained on, and no room for whitespace loops.
_TOOL_CALL_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 64  # compiled grammars kept per model (least recently used dropped first)
_NEG_INF_BITS = np.array([-np.inf], dtype=np.float32).view(np.int32)[0]  # 0xFF800000


class Constraint:
    """The grammar state of one sequence: `mask` before sampling, `accept` after. Not thread-safe (one per sequence).

    If the matcher ever rejects a token (possible only if the caller samples a masked token), `error` says why and
    from then on only the stop ids are allowed, so the sequence ends instead of running on unconstrained.
    """

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler) -> None:
        self._matcher = matcher
        self._c = compiler
        self._bits = np.zeros(compiler._live_words.size, dtype=np.int32)  # llguidance writes the mask here
        self._bias = np.empty(compiler._live_words.size * 32, dtype=np.int32)  # 0 or -inf, as float32 bits
        self.error: str | None = None

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids to -inf, in place."""
        n = min(self._c.tokenizer_vocab, logits.shape[-1])
        bias = self._c._stop_bias if self.error is not None else self._compute_bias()
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            view = logits.numpy()[:n]  # shares memory: the add below is in place
            np.add(view, bias[:n], out=view)
        else:  # another device or dtype: one host-to-device copy of the bias
            logits[:n] += torch.from_numpy(bias[:n]).to(logits.device, logits.dtype)
        if logits.shape[-1] > n:
            logits[n:] = float("-inf")

    def _compute_bias(self) -> np.ndarray:
        """float32 [32 * words]: 0 where the grammar allows the token, -inf elsewhere.

        Done in numpy on purpose: these are five streaming passes over ~150k entries (about 0.1 ms), where torch's
        masked_fill or bit unpacking, multi-threaded on two busy cores, took 2-45 ms per token. -inf is built from
        its bit pattern (allowed bit 1 -> 0 - 0 = 0; bit 0 -> -1 & 0xFF800000 = -inf) so no branch or gather runs.
        """
        # llguidance writes one bit per token straight into our buffer (and drops the GIL while it works). Its
        # words are native u32; the byte view below assumes a little-endian host (x86, ARM).
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        np.bitwise_and(self._bits, self._c._live_words, out=self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # token 32 w + i = bit i of word w
        np.subtract(allowed, np.int32(1), out=self._bias)
        np.bitwise_and(self._bias, _NEG_INF_BITS, out=self._bias)
        return self._bias.view(np.float32)

    def accept(self, token: int) -> None:
        """Advance the grammar past the sampled token."""
        if self.error is not None:
            return
        if not 0 <= token < self._c.tokenizer_vocab:
            self.error = f"token {token} is outside the tokenizer's vocabulary"
        elif not self._matcher.consume_token(int(token)):
            message = self._matcher.get_error().strip().splitlines()  # the first line; the rest dumps parser state
            self.error = message[0] if message else f"token {token} does not fit the grammar"

    @property
    def finished(self) -> bool:
        """True when the output so far is a complete answer (the grammar may end here)."""
        return self.error is None and self._matcher.is_accepting()


class Grammar:
    """A compiled grammar; `constraint()` gives each sequence its own matcher (n=2 needs two)."""

    def __init__(self, compiler: GrammarCompiler, matcher: llguidance.LLMatcher, lark: str) -> None:
        self._compiler = compiler
        self._proto = matcher  # never advanced: copies start from the initial state
        self.lark = lark  # the grammar source, for debugging

    def constraint(self) -> Constraint:
        return Constraint(self._proto.deep_copy(), self._compiler)


class GrammarCompiler:
    """One per loaded model: wraps the tokenizer for llguidance once (slow) and caches compiled grammars.

    tokenizer: qwenkit.text.tokenizer.Tokenizer; vocab_size: the model's logits width (may exceed the tokenizer's);
    stop_ids: the ids that end generation, allowed wherever the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        self.vocab_size = int(vocab_size)
        self.tokenizer_vocab = int(tokenizer.vocab_size)
        stops = sorted(t for t in stop_ids if 0 <= t < self.tokenizer_vocab) or [tokenizer.eos_token_id]
        self.stop_ids = frozenset(stops)
        # A copy without padding/truncation serialises to exactly the tokenizer.json llguidance expects; no
        # transformers needed. llguidance treats every added token (<tool_call>, <think>, ...) as special: free text
        # and JSON strings can never contain them, only the grammar's explicit <[id]> references can.
        backend = copy.copy(tokenizer.backend)
        backend.no_padding()
        backend.no_truncation()
        self._lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.tokenizer_vocab, eos_token=stops)
        self._ids = {t: tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")}
        self._live_words = _pack_bits(self._live_tokens(backend))
        # After a grammar error only the stop ids remain, so the sequence ends rather than runs unconstrained.
        self._stop_bias = np.full(self._live_words.size * 32, -np.inf, dtype=np.float32)
        self._stop_bias[stops] = 0.0
        self._cache: OrderedDict[tuple, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def _live_tokens(self, backend: Any) -> np.ndarray:
        """Bool [tokenizer vocab]: tokens a grammar may ever allow. GGUF files fill the embedding rows past the real
        vocabulary with tokens spelled `[PAD<id>]`; they are ordinary BPE tokens to llguidance (so they could match
        inside a JSON string) but the model never learned them."""
        live = np.ones(self.tokenizer_vocab, dtype=bool)
        for text, tid in backend.get_vocab(with_added_tokens=True).items():
            if text.startswith("[PAD") and text == f"[PAD{tid}]" and tid < self.tokenizer_vocab:
                live[tid] = False
        return live

    # ------------------------------------------------------------------ grammars

    def json(self, schema: dict | None, *, thinking: bool = False) -> Grammar:
        """Exactly one JSON value valid under `schema` (json_schema response_format); None: any JSON object."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise BadRequest(f"JSON schema must be an object, got {type(schema).__name__}")
        key = ("json", _dumps(schema), thinking)

        def build() -> Grammar:
            body = {**schema, "x-guidance": {"whitespace_pattern": _JSON_WHITESPACE}}  # ours, not the client's
            lark = self._lark(f"answer: %json {_dumps(body)}", thinking)
            return self._compile(lark, lambda msg: f"invalid or unsupported JSON schema: {msg}")

        return self._cached(key, build)

    def tool_calls(
        self, tools: list[dict], *, name: str | None = None, parallel: bool = True, thinking: bool = False
    ) -> Grammar:
        """One or more (one if not parallel) Qwen tool-call blocks, each calling one of `tools` (OpenAI `tools`
        entries) with arguments valid under its `parameters`, or exactly `name` when given (named tool_choice).

        Parameter schemas are compiled leniently (keywords llguidance does not implement are ignored rather than
        refused): tools often come from MCP servers with loose schemas, and refusing the request would be worse.
        """
        functions = _functions(tools)
        if name is not None:
            if name not in functions:
                known = ", ".join(repr(n) for n in functions) or "none"
                raise BadRequest(f"tool_choice names function {name!r}, which is not among the tools ({known})")
            functions = {name: functions[name]}
        if not functions:
            raise BadRequest("tool calls were required but no tools were given")
        open_id, close_id = self._ids["<tool_call>"], self._ids["</tool_call>"]
        if open_id is None or close_id is None:
            raise BadRequest("this model's tokenizer has no <tool_call> / </tool_call> tokens: it cannot call tools")
        key = ("tools", _dumps(functions), parallel, thinking)

        def build() -> Grammar:
            calls = [_call_schema(fn, params) for fn, params in functions.items()]
            body = calls[0] if len(calls) == 1 else {"anyOf": calls}
            body = {**body, "x-guidance": {**_TOOL_CALL_STYLE, "lenient": True}}
            # A newline may follow the last call: a model that wants to go on writing then picks between stopping
            # and another call, instead of being forced into another call by the separator (seen with the 0.5B
            # coder model: one "\n" after </tool_call> and it looped on calls until max_tokens).
            rules = [
                'calls: call ("\\n" call)* "\\n"?' if parallel else 'calls: call "\\n"?',
                f'call: <[{open_id}]> "\\n" answer "\\n" <[{close_id}]>',
                f"answer: %json {_dumps(body)}",
            ]
            lark = self._lark("\n".join(rules), thinking, top="calls")
            return self._compile(lark, lambda msg: self._tool_error(functions, msg))

        return self._cached(key, build)

    # ------------------------------------------------------------------ internals

    def _lark(self, rules: str, thinking: bool, top: str = "answer") -> str:
        """Wrap `rules` (defining `top`) in a start rule, after a reasoning block when thinking.

        The reasoning is any text, optionally opened by `<think>` (some templates put it in the prompt) and closed by
        `</think>`, then optional whitespace. Special tokens never match text, so it cannot swallow `</think>`.
        The block is required, not optional: a free-text lexeme that may also be skipped swallows the answer's
        first bytes (llguidance lexes greedily, so `{` would always be read as reasoning), and with the block
        optional every token would stay allowed until `</think>` anyway. A thinking Qwen3 always writes the block
        (it may be empty). A tokenizer without `</think>` (Qwen2.5) cannot think, so thinking is ignored there.
        """
        think_open, think_close = self._ids["<think>"], self._ids["</think>"]
        if thinking and think_close is not None:
            opener = f"<[{think_open}]>? " if think_open is not None else ""
            head = [
                f"start: reasoning {top}",
                f"reasoning: {opener}REASONING <[{think_close}]> WS?",
                r"REASONING: /(.|\n)*/",
                r"WS: /[ \t\r\n]+/",
            ]
        else:
            head = [f"start: {top}"]
        return "%llguidance {}\n" + "\n".join(head) + "\n" + rules + "\n"

    def _compile(self, lark: str, describe) -> Grammar:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if is_error:
            raise BadRequest(describe(messages[0] if messages else "unknown error"))
        matcher = llguidance.LLMatcher(self._lltok, grammar, log_level=0)
        if matcher.is_error():
            raise BadRequest(describe(matcher.get_error()))
        return Grammar(self, matcher, lark)

    def _tool_error(self, functions: dict[str, dict], msg: str) -> str:
        """Name the tool whose parameters schema is at fault (checked one by one only on this error path)."""
        for fn, params in functions.items():
            body = {**_call_schema(fn, params), "x-guidance": {**_TOOL_CALL_STYLE, "lenient": True}}
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                llguidance.LLMatcher.grammar_from_lark(f"start: %json {_dumps(body)}\n"), self._lltok
            )
            if is_error:
                return f"tool {fn!r}: invalid or unsupported parameters schema: {messages[0] if messages else msg}"
        return f"tool call grammar could not be built: {msg}"

    def _cached(self, key: tuple, build) -> Grammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = build()  # outside the lock: compiling can take a while; a rare duplicate build is harmless
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar


def _dumps(value: Any) -> str:
    """JSON text keeping key order (the grammar fixes properties in schema order, so order is part of the key)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"schema is not valid JSON: {e}") from e


def _functions(tools: Any) -> dict[str, dict]:
    """{name: parameters schema} from OpenAI `tools` entries, in order."""
    if not isinstance(tools, list):
        raise BadRequest(f"tools must be a list, got {type(tools).__name__}")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        if tool.get("type", "function") != "function":
            raise BadRequest(f"tools[{i}].type must be 'function', got {tool.get('type')!r}")
        params = fn.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}] ({fn['name']!r}): parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise BadRequest(f"tools[{i}] ({fn['name']!r}): parameters must describe an object (type 'object')")
        out[fn["name"]] = {"type": "object", **params}
    return out


def _call_schema(name: str, params: dict) -> dict:
    """The JSON of one Qwen tool call: name first, then arguments, nothing else."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _pack_bits(flags: np.ndarray) -> np.ndarray:
    """Bool [n] -> int32 [ceil(n / 32)] with bit i of word w set for flags[32 w + i] (llguidance's layout)."""
    words = (flags.size + 31) // 32
    padded = np.zeros(words * 32, dtype=bool)
    padded[: flags.size] = flags
    return np.packbits(padded, bitorder="little").view(np.int32)
