"""Continuous batching: which tokens of which requests the next forward pass computes.

Every step:
1. requests that were aborted (client gone) or ran past their deadline leave and free their blocks;
2. waiting requests join while the batch has room and the pool has blocks for their prompt (prefix-cache hits
   first: blocks another request already computed are shared, not recomputed);
3. one forward pass runs the next token of every decoding request plus prompt chunks of joining ones, up to
   `prefill_chunk` rows in all, so a long prompt is spread over several steps and never stalls the others long;
4. each request whose pass produced a next-token distribution samples (the ModelRunner runs the pass and the
   samplers, qwenkit.engine.runner), streams its Response, and leaves when done.
With speculation (qwenkit.engine.speculative), a decoding request may also guess its next few tokens: they run
through the model in the same pass, and the step gives it every guess the model agrees with plus one token of the
model's own; the rest are rolled back (their blocks freed).
When decoding needs a block and none is left, the youngest request is preempted: its blocks are freed and it waits
at the head of the queue to recompute its context later (its sampler and text state are kept, so no output is lost).
Requests may use different LoRA adapters in one step: each flat row carries its request's adapter id, and the
prefix cache keeps each adapter's blocks apart (the same tokens have other keys and values under another adapter).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.multimodal import MultimodalPrompt
from qwenkit.engine.output import OutputProcessor
from qwenkit.engine.paged import BlockPool
from qwenkit.engine.response import SpeculationStats
from qwenkit.engine.runner import ModelRunner
from qwenkit.engine.sampling import Sampler, TokenLogprob
from qwenkit.engine.speculative import Proposer, SpecState, Speculation, verify
from qwenkit.errors import ContextTooLong, QwenkitError, RequestTimeout
from qwenkit.memory import peak_rss_bytes

if TYPE_CHECKING:
    from qwenkit.engine.adapters import AdapterSet

log = logging.getLogger("qwenkit.engine")

KV_CACHE_BYTES = 1 << 30  # default pool size when kv_blocks is not given
MIN_PREFILL_ROWS = 16


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose keys and values were reused
    preemptions: int = 0  # requests sent back to the queue because the block pool ran out
    kv_bytes_per_token: int = 0  # keys and values of one token over all layers, in the pool's dtype
    spec_proposed: int = 0  # tokens guessed by speculation (lookup or draft model)
    spec_accepted: int = 0  # of those, tokens the target model kept
    decode_passes: int = 0  # decode steps of one request (one target pass each, guesses or not)
    decode_tokens: int = 0  # tokens those steps gave


class Sequence:
    """One request inside the engine: its tokens, its blocks and its sampling / output state."""

    def __init__(self, stream, vocab_size: int, tokenizer, max_model_len: int, spec: SpecState | None = None,
                 mm: MultimodalPrompt | None = None):
        req = stream.request
        self.stream = stream
        self.tokens = list(req.prompt_ids)
        self.prompt_len = len(req.prompt_ids)
        self.limit = min(self.prompt_len + req.max_new_tokens, max_model_len)  # total tokens it may reach
        self.computed = 0  # leading tokens whose keys and values are in the pool
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []  # prefix-cache identity of each full block, in order
        self.adapter = req.adapter
        self.root = b"" if not req.adapter else b"adapter:%d" % req.adapter  # where its prefix-cache chain starts
        self.sampler = Sampler(req.params, vocab_size, req.prompt_ids, req.constraint)
        self.output = OutputProcessor(tokenizer, self.prompt_len, req.params.stop, req.stop_ids, req.parser)
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.spec = spec  # its speculation state, where the engine speculates
        self.decode_passes = 0  # steps after the prompt's that gave it tokens
        self.draft: list[int] = []  # this step's guessed tokens (the last tokens of `tokens` during the step)
        self.draft_q: list | None = None  # the distributions the guesses were drawn from (None: lookup or greedy)
        self.mm = mm  # the prompt's images, if it has any

    def key_tokens(self, start: int, end: int) -> list[int]:
        """What identifies tokens [start, end) in the prefix cache: the tokens, with image tokens keyed by their
        image (qwenkit.engine.multimodal)."""
        if self.mm is None:
            return self.tokens[start:end]
        prompt = self.prompt_len
        return self.mm.keys[start:min(end, prompt)] + self.tokens[max(start, prompt):end]

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next sample (1 while decoding)."""
        return len(self.tokens) - self.computed


class Scheduler:
    def __init__(
        self, model, tokenizer, *, max_batch: int, max_model_len: int, block_size: int, kv_blocks: int | None,
        prefill_chunk: int, kv_dtype: torch.dtype, adapters: AdapterSet | None = None,
        speculation: Speculation | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_model_len, self.prefill_chunk = max_batch, max_model_len, prefill_chunk
        self.block_size = block_size
        if kv_blocks is None:
            per_token = BlockPool.bytes_per_token_of(model.config, kv_dtype)
            tokens = min(max_batch * max_model_len, max(KV_CACHE_BYTES // per_token, max_model_len))
            kv_blocks = -(-tokens // block_size)
        self.pool = BlockPool(model.config, kv_blocks, block_size, kv_dtype)
        self.runner = ModelRunner(model, self.pool, adapters)
        self.proposer = None if speculation is None else Proposer(
            speculation, num_blocks=kv_blocks, block_size=block_size, kv_dtype=kv_dtype,
            vocab_size=model.config.vocab_size)
        self.spec_proposed = self.spec_accepted = self.decode_passes = self.decode_tokens = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def add(self, stream) -> None:
        prompt = len(stream.request.prompt_ids)
        if prompt + 1 > self.max_model_len:
            stream.put(ContextTooLong(f"prompt is {prompt} tokens; this server's limit is {self.max_model_len}"))
            return
        if -(-(prompt + 1) // self.block_size) > self.pool.num_blocks:
            held = self.pool.num_blocks * self.block_size
            stream.put(ContextTooLong(f"prompt is {prompt} tokens; the KV cache holds {held}"))
            return
        mm = None
        placeholder = self.model.config.image_token_id  # None for a text-only model: no scan of the prompt
        if stream.request.images or (placeholder is not None and placeholder in stream.request.prompt_ids):
            # (image tokens without their images would run as plain embeddings: a silent wrong answer)
            try:
                mm = MultimodalPrompt(stream.request.prompt_ids, stream.request.images, self.model.config)
            except QwenkitError as e:
                stream.put(e)
                return
        # Guesses run on text positions only: a request with images does not speculate.
        spec = self.proposer.new_state() if self.proposer is not None and mm is None else None
        self.waiting.append(Sequence(stream, self.model.config.vocab_size, self.tokenizer, self.max_model_len, spec,
                                     mm))

    def waiting_count(self) -> int:
        return len(self.waiting)

    def free_slots(self) -> int:
        return max(self.max_batch - len(self.running), 0)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def stats(self, extra_waiting: int = 0) -> EngineStats:
        return EngineStats(
            running=len(self.running), waiting=len(self.waiting) + extra_waiting, kv_blocks_used=self.pool.used,
            kv_blocks_total=self.pool.num_blocks, prefix_cache_queries=self.pool.queries,
            prefix_cache_hits=self.pool.hits, preemptions=self.preemptions,
            kv_bytes_per_token=self.pool.bytes_per_token, spec_proposed=self.spec_proposed,
            spec_accepted=self.spec_accepted, decode_passes=self.decode_passes, decode_tokens=self.decode_tokens,
        )

    def fail_all(self, error: QwenkitError) -> None:
        for seq in list(self.running) + list(self.waiting):
            self._drop(seq)
            seq.stream.put(error)

    def _drop(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes, seq.computed = [], [], 0
        if self.proposer is not None:
            self.proposer.forget(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- one step ----------------------------------------------------------------------------------------------
    def step(self) -> None:
        self._reap()
        self._admit()
        plan = self._plan()
        if not plan:
            return
        try:
            if self.proposer is not None:
                plan = self._guess(plan)
            outputs = self.runner.run(plan)
            for seq, first, end in plan:
                seq.computed = end
            results = [(seq, self._verify(seq, logits) if seq.draft else [seq.sampler(logits[0])])
                       for seq, logits in outputs]
            for seq, _, _ in plan:
                self.pool.register_full_blocks(seq)
                if seq.mm is not None and seq.computed >= seq.prompt_len:
                    seq.mm.features = None  # the prompt is in the cache: its images' features are not needed
            now = time.monotonic()
            for seq, tokens in results:
                if len(seq.tokens) > seq.prompt_len:  # a decode step (not a prompt's first token)
                    self.decode_passes += 1
                    self.decode_tokens += len(tokens)
                    seq.decode_passes += 1
                for token, logprob in tokens:
                    if self._append(seq, token, logprob, now):
                        break
        except Exception as e:  # a bug must not take the server down: fail the requests in this batch
            log.exception("engine step failed")
            for seq, _, _ in plan:
                self._drop(seq)
                seq.stream.put(QwenkitError(f"internal engine error: {type(e).__name__}: {e}"))

    # ---- speculation ---------------------------------------------------------------------------------------------
    def _guess(self, plan: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, int, int]]:
        """Guesses for the decoding sequences of the plan, appended to their tokens, with blocks for them."""
        wants = []
        for seq, first, end in plan:
            seq.draft, seq.draft_q = [], None
            decoding = end == len(seq.tokens) and end - first == 1 and first >= seq.prompt_len
            if seq.spec is not None and decoding:
                k = seq.spec.wanted(seq.limit - len(seq.tokens) - 1)  # room for the target's own token after them
                if k > 0:
                    wants.append((seq, k))
        if not wants:
            return plan
        self.proposer.propose(wants)
        for seq, _ in wants:
            # Blocks for the guesses from what is free; never by preempting (that is kept for real tokens).
            room = (len(seq.blocks) + self.pool.available) * self.block_size - len(seq.tokens)
            del seq.draft[max(room, 0):]
            if not seq.draft:
                seq.draft_q = None
                continue
            while len(seq.blocks) * self.block_size < len(seq.tokens) + len(seq.draft):
                seq.blocks.append(self.pool.allocate())
            seq.tokens += seq.draft
        return [(seq, first, end + len(seq.draft)) for seq, first, end in plan]

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """The tokens this step gives a sequence that guessed; its guesses leave its tokens, and the keys and values
        of those the model did not keep are rolled back (the blocks past them freed)."""
        guess, q = seq.draft, seq.draft_q
        committed = len(seq.tokens) - len(guess)
        del seq.tokens[committed:]
        seq.draft, seq.draft_q = [], None
        tokens = verify(seq.sampler, logits, guess, q)
        kept = len(tokens) - 1
        seq.spec.record(len(guess), kept)
        self.spec_proposed += len(guess)
        self.spec_accepted += kept
        seq.computed = committed + kept  # the kept guesses' keys and values are right; the target's token is next
        keep_blocks = -(-seq.computed // self.block_size)
        self.pool.release(seq.blocks[keep_blocks:])
        del seq.blocks[keep_blocks:]
        return tokens

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in list(self.running) + list(self.waiting):
            if seq.stream.aborted:
                self._drop(seq)
            elif seq.stream.deadline is not None and now > seq.stream.deadline:
                self._drop(seq)
                timeout = seq.stream.request.timeout
                seq.stream.put(RequestTimeout(f"request ran past its {timeout:g} s timeout"))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            # The last token is always computed anew: its logits are what the next sample needs.
            blocks, hashes = self.pool.match_prefix(seq.key_tokens(0, len(seq.tokens)), len(seq.tokens) - 1, seq.root)
            needed = -(-len(seq.tokens) // self.block_size) - len(blocks)
            if needed > self.pool.available - self._decode_reserve():
                self.pool.release(blocks)
                break
            seq.blocks = blocks + [self.pool.allocate() for _ in range(needed)]
            seq.hashes = hashes
            seq.computed = len(blocks) * self.block_size
            self.running.append(self.waiting.popleft())

    def _decode_reserve(self) -> int:
        """Blocks the running decoders need for their next token (kept free when admitting)."""
        return sum(1 for s in self.running if s.pending == 1 and self._needs_block(s))

    def _needs_block(self, seq: Sequence) -> bool:
        """Its next token falls past the blocks it holds."""
        return seq.computed >= len(seq.blocks) * self.block_size

    def _plan(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first token, end token) to compute this step."""
        plan: list[tuple[Sequence, int, int]] = []
        for seq in list(self.running):
            if seq.pending == 1 and seq in self.running and self._ensure_block(seq):
                plan.append((seq, seq.computed, seq.computed + 1))
        # Decode rows and prompt rows share one forward pass of at most prefill_chunk rows (each kind on its own
        # kernels: see qwenkit.engine.runner); a joining prompt always gets some rows, so it cannot starve behind
        # a full batch of decoders.
        budget = max(self.prefill_chunk - len(plan), min(MIN_PREFILL_ROWS, self.prefill_chunk))
        for seq in self.running:
            if seq.pending > 1 and budget > 0:
                end = min(len(seq.tokens), seq.computed + budget)
                plan.append((seq, seq.computed, end))
                budget -= end - seq.computed
        return plan

    def _ensure_block(self, seq: Sequence) -> bool:
        """Room for one more token; may preempt younger requests. False if `seq` itself had to wait."""
        if not self._needs_block(seq):
            return True
        while self.pool.available == 0:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks.append(self.pool.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting request %d: KV cache full", seq.stream.id)
        self.preemptions += 1
        self._drop(seq)
        self.waiting.appendleft(seq)

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> bool:
        """Add a sampled token to the answer. -> whether the answer is done (the sequence has left)."""
        if not seq.first_token_at:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.tokens.append(token)
        step = seq.output.push(token, logprob)
        if step is not None:
            seq.stream.put(step)
        if seq.output.stopped or len(seq.tokens) >= seq.limit:
            self._finish(seq)
            return True
        return False

    def _finish(self, seq: Sequence) -> None:
        last = seq.output.finish(seq.stream.submitted, seq.first_token_at, seq.last_token_at)
        last.peak_memory_gb = peak_rss_bytes() / 2**30
        if seq.spec is not None:
            last.speculation = SpeculationStats(seq.spec.proposed, seq.spec.accepted, seq.decode_passes)
        self._drop(seq)
        seq.stream.put(last)
        seq.stream.close()
