"""The Python API: `qwenkit.load(ref)` returns a Model with `generate` (raw text) and `chat` (messages, tools).

Both return one aggregated Response, or with stream=True an iterator of Responses, one per generated token. Every
call runs on the model's batching engine (qwenkit.engine.engine), the same one `qwenkit serve` runs: one request is
a batch of one, and calls from several threads share its steps.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenkit.checkpoint import Checkpoint, open_checkpoint
from qwenkit.engine.engine import Engine, GenerationRequest
from qwenkit.engine.multimodal import ImageInput
from qwenkit.engine.response import Response
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.speculative import Speculation, check_vocabulary
from qwenkit.errors import BadRequest, ContextTooLong
from qwenkit.media.sources import SourcePolicy
from qwenkit.memory import give_back_large_frees, release_free_heap
from qwenkit.model.vision import num_image_tokens
from qwenkit.quant.plan import KernelPlan


@dataclass
class Prepared:
    """A prompt ready to generate from: what both the in-process API and the server's engine requests need."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # the budget: max_tokens, or what is left of the context
    stop_ids: set[int]
    chat: bool  # output is split into reasoning / content / tool calls (a StreamParser per sequence)
    thinking: bool  # a Qwen3 model that will reason first (thinking on, or a template that opened <think>)
    in_reasoning: bool  # the prompt ends inside an opened <think> block
    tokenizer: Any = field(repr=False, default=None)
    images: list = field(default_factory=list)  # engine.multimodal.ImageInput of the prompt's images, in order

    def new_parser(self, seed: int | None = None):
        """A fresh text.stream.StreamParser for one generated sequence (None for raw completions).

        seed: tool-call ids are drawn from it (defaults to the sampling seed, so a seeded request repeats exactly).
        """
        if not self.chat:
            return None
        from qwenkit.text.stream import StreamParser

        return StreamParser(
            self.tokenizer, in_reasoning=self.in_reasoning, seed=self.params.seed if seed is None else seed
        )


class Model:
    def __init__(
        self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, threads: int | None = None, quant: str = "auto"
    ):
        from qwenkit.text.chat import ChatTemplate

        if threads:
            torch.set_num_threads(threads)
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        started = time.perf_counter()
        self.quant = quant
        give_back_large_frees()
        self.kernel_plan = KernelPlan.detect()
        # The tokenizer first: building it takes ~60 MB for a moment, which then does not stack on the weights
        # (peak resident memory), and a GGUF's vocabulary arrays are freed before the weights arrive.
        self.tokenizer = checkpoint.tokenizer()
        release_free_heap()
        self.model = checkpoint.load_model(dtype, quant)
        release_free_heap()
        self.image_spec = checkpoint.image_spec()  # read once (None for a text-only model), not per request
        self.load_seconds = time.perf_counter() - started
        self.template = ChatTemplate(
            self.tokenizer.chat_template,
            bos_token=self._token_text(self.tokenizer.bos_token_id),
            eos_token=self._token_text(self.tokenizer.eos_token_id),
        )
        self.stop_token_ids = set(checkpoint.stop_token_ids(self.tokenizer))
        self.context_length = self.config.max_position_embeddings
        self._engine: Engine | None = None
        self._engine_options: dict[str, Any] = {}
        self._engine_lock = threading.RLock()

    @property
    def takes_images(self) -> bool:
        """A vision-language model: chat messages may carry image parts."""
        return self.config.vision is not None

    def describe_kernels(self) -> str:
        """The kernel plan this model runs on (`qwenkit run -v`, `qwenkit info --kernels`)."""
        engine = self._engine
        return self.kernel_plan.describe(self.checkpoint.tensors(), self.quant, self.model.dtype,
                                         engine.scheduler.pool.k[0].dtype if engine is not None else None)

    # ---- the engine ------------------------------------------------------------------------------------------
    def start_engine(self, **options) -> Engine:
        """Start the batching engine that generation runs on, with Engine's options (max_batch, kv_dtype,
        adapters, ...). One that was running stops: requests still in it end with EngineStopped. A new engine
        also starts with an empty prefix cache, which is what changing the weights in place (load_adapter) needs."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.shutdown(drain=False)
            options.setdefault("max_model_len", self.context_length)
            self._engine_options = options
            self._engine = Engine(self.model, self.tokenizer, **options)
            self._engine.start()
            return self._engine

    @property
    def engine(self) -> Engine:
        """The running engine: started with its defaults on first use, and again with the last options given
        after it was shut down."""
        with self._engine_lock:  # reentrant: start_engine takes it too
            if self._engine is None or self._engine.stopping:
                self.start_engine(**self._engine_options)
            return self._engine

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    # ---- prompts ---------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        """The prompt text the model sees for this conversation, through the checkpoint's own chat template.

        continue_final_message=True (with add_generation_prompt=False) leaves the last assistant message open, so
        the answer carries on from its last character."""
        return self.template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
            continue_final_message=continue_final_message, vision=self.takes_images,
        )

    def _params(self, thinking: bool, sampling: dict[str, Any]) -> SamplingParams:
        params = SamplingParams.from_kwargs(self.checkpoint.sampling_defaults(thinking), **sampling)
        outside = [t for t in params.logit_bias if t >= self.config.vocab_size]
        if outside:
            raise BadRequest(f"logit_bias: token id {outside[0]} is outside the vocabulary "
                             f"({self.config.vocab_size} tokens)")
        return params

    def _budget(self, prompt_ids: list[int], params: SamplingParams) -> int:
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ContextTooLong(
                f"prompt is {len(prompt_ids)} tokens, the model's context is {self.context_length} tokens"
            )
        return min(params.max_tokens or room, room)

    def _prepared(self, prompt_ids: list[int], params: SamplingParams, *, chat: bool, thinking: bool = False,
                  in_reasoning: bool = False, images: list | None = None) -> Prepared:
        return Prepared(
            images=images or [],
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=self._budget(prompt_ids, params),
            stop_ids=self.stop_token_ids | set(params.stop_token_ids),
            chat=chat,
            thinking=thinking,
            in_reasoning=in_reasoning,
            tokenizer=self.tokenizer,
        )

    # ---- prompts, ready to generate (shared by generate/chat here and by the HTTP server) ----------------------
    def prepare_generate(self, prompt: str | list[int], **sampling) -> Prepared:
        """Token ids, sampling parameters and budget for raw text (or token ids) with no chat template."""
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.config.vocab_size for t in prompt
        ):
            prompt_ids = list(prompt)
        else:
            raise BadRequest("prompt must be a string or a list of token ids within the vocabulary")
        if not prompt_ids:
            raise BadRequest("prompt is empty")
        return self._prepared(prompt_ids, self._params(False, sampling), chat=False)

    def prepare_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        image_sources: SourcePolicy | None = None,
        **sampling,
    ) -> Prepared:
        """Token ids, sampling parameters (the model's thinking or non-thinking defaults under `sampling`), budget
        and parsing state for a conversation (continue_final_message: carry on the last assistant message).
        Image parts (a vision-language model) are read under `image_sources` (default: files, data: and http(s)
        URLs) and preprocessed here."""
        from qwenkit.text.chat import image_sources as sources_of
        from qwenkit.text.stream import StreamParser

        text = self.render(messages, tools=tools, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        prompt_ids = self.tokenizer.encode(text)
        images = []
        if self.takes_images:
            sources = sources_of(messages)
            if sources:
                prompt_ids, images = self._with_images(prompt_ids, sources, image_sources or SourcePolicy())
        # Some templates (Qwen3 thinking releases) end the prompt inside an opened <think> block.
        opened = StreamParser.prompt_in_reasoning(self.tokenizer, prompt_ids)
        thinking = self.config.model_type.startswith("qwen3") and (opened or enable_thinking is not False)
        params = self._params(thinking, sampling)
        return self._prepared(prompt_ids, params, chat=True, thinking=thinking, in_reasoning=opened, images=images)

    def _with_images(self, prompt_ids: list[int], sources: list[str],
                     policy: SourcePolicy) -> tuple[list[int], list[ImageInput]]:
        """Each image read and preprocessed, and its one placeholder token in the prompt widened to its tokens."""
        from qwenkit.media.image import load_image, preprocess
        from qwenkit.media.sources import read_source

        spec = self.image_spec
        merge, placeholder = spec.merge_size, self.config.image_token_id
        images = []
        for i, url in enumerate(sources):
            where = url if not url.startswith("data:") and policy.files else f"image {i + 1} of the request"
            data = read_source(url, where, policy)
            pixels, grid = preprocess(load_image(data, source=where), spec, source=where)
            digest = hashlib.blake2b(data + repr(spec).encode(), digest_size=16).digest()
            images.append(ImageInput(pixels, grid, digest))
        if prompt_ids.count(placeholder) != len(images):
            raise BadRequest(f"the chat template rendered {prompt_ids.count(placeholder)} image placeholders for "
                             f"{len(images)} images")
        out, pending = [], iter(images)
        for token in prompt_ids:
            out += [token] * num_image_tokens(next(pending).grid, merge) if token == placeholder else [token]
        return out, images

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], *, stream: bool = False, **sampling) -> Response | Iterator[Response]:
        """Continue raw text (or token ids) with no chat template."""
        return self._run(self.prepare_generate(prompt, **sampling), stream=stream)

    def chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        stream: bool = False,
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **sampling,
    ) -> Response | Iterator[Response]:
        """Answer a conversation; reasoning, content and tool calls come back apart. continue_final_message=True
        (with add_generation_prompt=False) continues the last assistant message instead of starting a new one."""
        prepared = self.prepare_chat(messages, tools=tools, enable_thinking=enable_thinking,
                                     add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, **sampling)
        return self._run(prepared, stream=stream)

    def request(self, p: Prepared, **options) -> GenerationRequest:
        """The engine request for a prepared prompt (options: GenerationRequest's constraint, timeout, adapter)."""
        return GenerationRequest(p.prompt_ids, p.params, p.max_new_tokens, p.stop_ids, p.new_parser(),
                                 images=p.images, **options)

    def stream(self, request: GenerationRequest) -> Iterator[Response]:
        """The Responses of one engine request; leaving the loop early frees its place in the engine."""
        handle = self.engine.submit(request, asynchronous=False)
        try:
            yield from handle
        finally:
            handle.abort()

    def _run(self, p: Prepared, stream: bool):
        steps = self.stream(self.request(p))
        if stream:
            return steps
        total = Response()
        for step in steps:
            total.merge(step)
        return total


def speculation_for(target: Model, *, draft: str | Path | None = None, lookup: int = 0, draft_tokens: int = 4,
                    quant: str = "auto", threads: int | None = None) -> Speculation | None:
    """The engine's speculative decoding for `target` (None when neither a draft nor lookup is asked for): the
    draft model is loaded here (by short name, hub id or path, as `load` takes them) and must share the target's
    vocabulary (BadConfig otherwise)."""
    if draft is None and not lookup:
        return None
    draft_model = None
    if draft is not None:
        loaded = load(draft, threads=threads, quant=quant)
        check_vocabulary(target.tokenizer, loaded.tokenizer, str(draft))
        draft_model = loaded.model
    return Speculation(draft=draft_model, lookup=lookup, draft_tokens=draft_tokens)


def load(
    ref: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    quant: str = "auto",
    pull: bool = True,
    mmproj: str | Path | None = None,
) -> Model:
    """Load a model by short name (`qwen2.5-coder:0.5b`), Hugging Face id, or local path (.gguf file or folder).

    Names not cached yet are pulled first (set pull=False to fail instead); once cached, no network is used.
    quant: auto (quantized GGUF weights stay compact and exact, float weights stay float), int8, int4 or none.
    mmproj: the vision tower of a llama.cpp VL model's GGUF (default: the one mmproj*.gguf beside it, if any).
    """
    from qwenkit import hub

    path = hub.pull(str(ref)) if pull else hub.resolve(str(ref))
    return Model(open_checkpoint(path, mmproj=Path(mmproj) if mmproj else None), dtype=dtype, threads=threads,
                 quant=quant)
