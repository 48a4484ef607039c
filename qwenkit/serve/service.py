"""The model behind the server: loaded in a background thread while HTTP already answers, then wrapped in an Engine
(continuous batching) and a GrammarCompiler (constrained decoding). Its `state` drives /health.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qwenkit.engine.engine import Engine, kv_dtype
from qwenkit.errors import BadConfig, QwenkitError
from qwenkit.runtime import speculation_for

log = logging.getLogger("qwenkit.serve")

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


@dataclass
class ServeConfig:
    model: str  # short name, hub id or path, as given on the command line
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    quant: str = "auto"
    threads: int | None = None
    request_timeout: float | None = None
    max_body_bytes: int = 16 << 20  # room for a phone photo sent as a data: URL
    drain_timeout: float = 300.0  # seconds SIGTERM waits for in-flight requests
    lora: dict[str, str] = field(default_factory=dict)  # adapter name (a `model` clients may ask for) -> folder
    kv_dtype: str | None = None  # "f16" or "f32"; None: the engine's default (f16 for a float32 model)
    draft: str | None = None  # speculative decoding: a draft model (short name, hub id or path)
    draft_tokens: int = 4  # tokens the draft guesses a step, at most
    lookup: int = 0  # speculative decoding: prompt lookup of up to this many tokens a step (0: off)
    allow_image_urls: bool = False  # fetch http(s) image URLs named in requests (else data: URLs only)
    mmproj: str | None = None  # a llama.cpp VL model's vision tower GGUF (default: one beside the model file)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class ModelService:
    """Owns the loaded model, its engine and grammar compiler. Methods are safe to call from any thread."""

    def __init__(self, config: ServeConfig, loader: Callable[[], object] | None = None):
        if config.name in config.lora:  # that name would always choose the base model: the adapter unreachable
            raise BadConfig(f"--lora: adapter name {config.name!r} is the served model's own name; choose another")
        self.config = config
        self.state = LOADING
        self.error: BaseException | None = None
        self.model = None
        self.engine = None
        self.adapters = None  # an engine.adapters.AdapterSet when the server has --lora adapters
        self._grammar = None
        self._grammar_lock = threading.Lock()
        self.created = int(time.time())
        self._loader = loader or self._load_model
        self._thread: threading.Thread | None = None

    # ---- loading -----------------------------------------------------------------------------------------------
    def _load_model(self):
        import qwenkit

        return qwenkit.load(self.config.model, threads=self.config.threads, quant=self.config.quant,
                            mmproj=self.config.mmproj)

    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        def run() -> None:
            try:
                self._start(self._loader())
            except BaseException as e:  # noqa: BLE001 - reported to the server, which exits with the message
                if not isinstance(e, QwenkitError):
                    log.exception("loading %s failed", self.config.model)
                self.error, self.state = e, FAILED
                if on_failure is not None:
                    on_failure(e)

        self._thread = threading.Thread(target=run, name="qwenkit-load", daemon=True)
        self._thread.start()

    def _start(self, model) -> None:
        limit = self.config.max_model_len
        if limit is not None:
            # Budgets (max_tokens defaults, context_length_exceeded) are computed against what the engine allows.
            model.context_length = min(model.context_length, limit)
        adapters = None
        if self.config.lora:
            from qwenkit.engine.adapters import AdapterSet

            adapters = AdapterSet(model.model)
            for name, folder in self.config.lora.items():
                adapters.add(name, folder)
                log.info("adapter %s loaded from %s", name, folder)
        # An engine of the server's own (the same kind as the model's, with the server's options): another server
        # or the Python API over the same loaded model keeps its own.
        c = self.config
        speculation = speculation_for(model, draft=c.draft, lookup=c.lookup, draft_tokens=c.draft_tokens,
                                      quant=c.quant, threads=c.threads)
        engine = Engine(model.model, model.tokenizer, max_batch=c.max_batch, max_queue=c.max_queue,
                        max_model_len=model.context_length, kv_dtype=kv_dtype(c.kv_dtype), adapters=adapters,
                        speculation=speculation)
        engine.start()
        self.model, self.engine, self.adapters = model, engine, adapters
        try:  # now rather than on the first JSON or tool_choice request, which would wait for it
            self.grammar()
        except Exception as e:  # noqa: BLE001 - constrained requests will report it; the rest can still be served
            log.warning("constrained decoding unavailable: %s", e)
        log.info("model %s ready (context %d tokens)", self.config.name, model.context_length)
        if self.state == LOADING:  # a SIGTERM during loading keeps the server draining
            self.state = READY

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state == READY

    # ---- while serving -----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == READY

    def model_names(self) -> list[str]:
        """What a request's `model` may name: the base model, then each adapter."""
        return [self.config.name, *self.config.lora]

    def adapter_id(self, name: str | None) -> int:
        """The engine's adapter id for a request's `model` (0: the base model)."""
        if name is None or name == self.config.name or self.adapters is None:
            return 0
        return self.adapters.id_of(name)

    def grammar(self):
        """The model's GrammarCompiler, built on first use (about a second: it indexes the whole vocabulary)."""
        with self._grammar_lock:
            if self._grammar is None:
                from qwenkit.engine.grammar import GrammarCompiler

                m = self.model
                self._grammar = GrammarCompiler(m.tokenizer, m.config.vocab_size, m.stop_token_ids)
            return self._grammar

    def stats(self):
        return self.engine.stats() if self.engine is not None else None

    def drain(self) -> None:
        """SIGTERM: /health turns 503 and new generation requests get 503; requests in flight go on."""
        if self.state != FAILED:  # a failed load stays reported as such
            self.state = DRAINING

    def shutdown(self) -> None:
        """After the HTTP server stopped taking requests: let the engine finish what it has, then stop it."""
        self.drain()
        if self.engine is not None:
            self.engine.shutdown(drain=True, timeout=self.config.drain_timeout)
