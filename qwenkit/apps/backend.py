"""The model an app talks to: a qwenkit.Client over one model in this process, one OpenAI-compatible server, or a
route file (hosted first, on-device fallback, with failover even mid-answer). The assistant and live captions take
the same command-line flags for it (add_arguments) and open it the same way (open_chat)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qwenkit.errors import BadConfig, QwenkitError
from qwenkit.route.client import Client
from qwenkit.route.config import BackendConfig, RouteConfig

if TYPE_CHECKING:
    from qwenkit.text.tokenizer import Tokenizer


def open_chat(model: str | None = None, *, route: str | None = None, base_url: str | None = None,
              api_key: str | None = None, threads: int | None = None, quant: str = "auto",
              load_timeout: float = 600.0, lora: dict[str, str] | None = None) -> Client:
    """A started Client; a model in this process is loaded before this returns (its load error is raised here).
    With base_url, `model` is the name that server knows its model by (optional). lora: adapters served over a
    model in this process (name -> PEFT folder), chosen per request by `model=name`."""
    if lora and (route is not None or base_url is not None):
        raise BadConfig("a LoRA adapter applies to a model in this process: with --route or --base-url the "
                        "route file or the server names its adapters")
    if route is not None and (model is not None or base_url is not None):
        raise BadConfig("--route names the models itself: give no model and no --base-url with it")
    if route is None and base_url is None and model is None:
        raise BadConfig("give a model (a short name, hub id or path), --route or --base-url")
    if route is not None:
        client = Client(route)
    elif base_url is not None:
        client = Client(RouteConfig(backends=[BackendConfig(
            name="remote", type="openai", base_url=base_url.rstrip("/").removesuffix("/v1"), api_key=api_key,
            model=model, first_token_timeout=120.0, inter_token_timeout=60.0)]))
    else:
        client = Client(RouteConfig(backends=[BackendConfig(name="device", type="native", model=model,
                                                            threads=threads, quant=quant, max_batch=4,
                                                            lora=dict(lora or {}))]))
    for backend in client.router.backends:
        if not backend.remote and not backend.wait_loaded(load_timeout):
            error = getattr(getattr(backend, "service", None), "error", None)
            client.close()
            if isinstance(error, QwenkitError):
                raise error
            raise QwenkitError(f"the model of backend '{backend.name}' did not load: {error}")
    return client


def add_arguments(p: argparse.ArgumentParser, *, model_help: str) -> None:
    """--route | --base-url, --model, --api-key and --threads: where the app's Qwen model runs."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--route", metavar="ROUTE_YAML", help="hosted backends first, on-device fallback")
    where.add_argument("--base-url", help="an OpenAI-compatible server (qwenkit serve, vLLM, llama.cpp...)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--api-key", help="key for --base-url")
    p.add_argument("--threads", type=int, help="CPU threads of a model in this process")


def open_from_args(args: argparse.Namespace, default_model: str, lora: dict[str, str] | None = None) -> Client:
    """open_chat for the flags of add_arguments: the default model in this process unless told otherwise."""
    model = args.model if (args.model or args.route or args.base_url) else default_model
    return open_chat(model if not args.route else None, route=args.route, base_url=args.base_url,
                     api_key=args.api_key, threads=args.threads, lora=lora)


def local_tokenizer(client: Client) -> Tokenizer | None:
    """The tokenizer of a model loaded in this process, or None. Every Qwen model shares one vocabulary, so its
    token ids also mean the same to a hosted Qwen (for logit_bias)."""
    for backend in client.router.backends:
        service = getattr(backend, "service", None)
        if not backend.remote and service is not None and service.ready:
            return service.model.tokenizer
    return None


class DeviceNotice:
    """Tells the user when the answer starts coming from the on-device model because the hosted one did not
    answer, and when the hosted model is back: on a small device that answer is slower, and the user should know
    why. Fed each response's `qwenkit_backends`; says nothing for a single model or a route with no hosted backend.
    """

    def __init__(self, client: object):
        router = getattr(client, "router", None)
        backends = getattr(router, "backends", [])
        hosted = any(b.remote for b in backends)
        self.device = frozenset(b.name for b in backends if not b.remote) if hosted else frozenset()
        self.on_device = False

    def update(self, served: list[str]) -> str | None:
        """The message to show for the backends that served the latest answer (or part of it), if it changed."""
        if not self.device or not served:
            return None
        now = served[-1] in self.device
        if now == self.on_device:
            return None
        self.on_device = now
        if now:
            return "the hosted model did not answer: the on-device model is answering (slower)"
        return "the hosted model is answering again"
