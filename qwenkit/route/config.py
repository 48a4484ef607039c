"""route.yaml: the router's ordered backends, parsed strictly, with every error naming its line.

    probe_interval: 2          # seconds between health probes of remote backends (default 5)
    served_model_name: qwen    # the model id clients use (default: "qwenkit-router")
    backends:                  # tried in this order
      - name: hosted
        type: openai           # any OpenAI-compatible server: qwenkit serve, vLLM, llama.cpp, a cloud API
        base_url: https://host.example:8000   # /v1/chat/completions is appended (a trailing /v1 is accepted)
        api_key_env: HOSTED_KEY              # or api_key: sk-...
        model: qwen2.5-coder-7b-ft           # the backend's own model name
        aliases: {coder: qwen2.5-coder-7b-ft}  # requested name -> this backend's name
        connect_timeout: 2
        first_token_timeout: 20
        inter_token_timeout: 10
        retries: 1             # further tries of this backend before the next one (before the first token only)
        backoff: 0.25          # seconds before a retry, doubled each time
        breaker: {failures: 3, cooldown: 30}
        priority: 0            # optional: backends of equal priority are tried fastest (first token) first
      - name: device
        type: native           # a model in this process: the on-device fallback
        model: qwen2.5-coder:0.5b
        quant: auto
        threads: 2
        lookup: 4              # optional: speculative decoding by prompt lookup (up to 4 guessed tokens a step)
        images: refuse         # a text-only model's answer to image parts: refuse (a 400, the default) or drop
        # draft: PATH          # optional: or by a smaller draft model with the same vocabulary

The YAML is composed to its node tree (not just loaded) so that each value keeps its line for error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenkit.engine.speculative import MAX_GUESS
from qwenkit.errors import BadConfig

BACKEND_TYPES = ("native", "openai")


@dataclass
class BreakerConfig:
    failures: int = 3  # consecutive failures that open the breaker
    cooldown: float = 30.0  # seconds open before one trial request (half-open)


@dataclass
class BackendConfig:
    name: str
    type: str
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 2.0
    first_token_timeout: float = 30.0
    inter_token_timeout: float = 10.0
    retries: int = 0
    backoff: float = 0.25
    priority: int | None = None  # backends of equal priority are tried fastest first (default: file order)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # native only
    quant: str = "auto"
    threads: int | None = None
    max_model_len: int | None = None
    max_batch: int = 8
    lora: dict[str, str] = field(default_factory=dict)  # LoRA adapters served over the model: name -> folder
    draft: str | None = None  # a draft model for speculative decoding (short name, hub id or path)
    draft_tokens: int = 4  # tokens the draft guesses a step, at most
    lookup: int = 0  # prompt lookup guesses up to this many tokens a step (0: off)
    images: str = "refuse"  # image parts to a text-only model: "refuse" them (400) or "drop" them and answer the text
    line: int = 0  # where it was declared, for later messages

    def model_for(self, requested: str | None) -> str | None:
        """The model name to send this backend for a client's requested name (one of its adapters stays as is)."""
        if requested is not None and requested in self.aliases:
            return self.aliases[requested]
        if requested is not None and requested in self.lora:
            return requested
        return self.model


@dataclass
class RouteConfig:
    backends: list[BackendConfig]
    probe_interval: float = 5.0
    served_model_name: str = "qwenkit-router"
    source: str = "<route>"


_TOP_KEYS = {"backends", "probe_interval", "served_model_name"}
_COMMON = {"name", "type", "model", "aliases", "connect_timeout", "first_token_timeout", "inter_token_timeout",
           "retries", "backoff", "breaker", "priority"}
_KEYS = {"openai": _COMMON | {"base_url", "api_key", "api_key_env"},
         "native": _COMMON | {"quant", "threads", "max_model_len", "max_batch", "lora", "draft", "draft_tokens",
                              "lookup", "images"}}
IMAGE_POLICIES = ("refuse", "drop")
_NUMBERS = ("connect_timeout", "first_token_timeout", "inter_token_timeout", "backoff")


class _Reader:
    """Turns composed YAML nodes into values, raising BadConfig('file:line: ...') at the node at fault."""

    def __init__(self, source: str):
        self.source = source
        self._loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, message: str) -> BadConfig:
        return BadConfig(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def value(self, node: yaml.Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """key -> (key node, value node); unknown and repeated keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = self.value(k)
            if key not in allowed:
                raise self.fail(k, f"unknown key '{key}' in {what} (expected one of: {', '.join(sorted(allowed))})")
            if key in out:
                raise self.fail(k, f"key '{key}' is repeated in {what}")
            out[key] = (k, v)
        return out

    def typed(self, node: yaml.Node, key: str, kinds: tuple[type, ...], minimum: float | None = None,
              maximum: float | None = None) -> Any:
        v = self.value(node)
        if isinstance(v, bool) or not isinstance(v, kinds):
            names = " or ".join("a number" if k in (int, float) else "a string" if k is str else k.__name__
                                for k in kinds)
            raise self.fail(node, f"'{key}' must be {names}, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.fail(node, f"'{key}' must be at least {minimum}, got {v!r}")
        if maximum is not None and v > maximum:
            raise self.fail(node, f"'{key}' must be at most {maximum}, got {v!r}")
        return v


def parse_route(text: str, source: str = "<route>") -> RouteConfig:
    """Parse a route file's text; every error is a BadConfig naming `source` and the line."""
    r = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise BadConfig(f"{source}{line}: not valid YAML: {e.problem or e}") from None
    if root is None:
        raise BadConfig(f"{source}: the route file is empty")
    top = r.mapping(root, "the route file", _TOP_KEYS)
    if "backends" not in top:
        raise r.fail(root, "missing 'backends' (the ordered list of backends)")
    out = RouteConfig(backends=[], source=source)
    if "probe_interval" in top:
        out.probe_interval = float(r.typed(top["probe_interval"][1], "probe_interval", (int, float), 0.01))
    if "served_model_name" in top:
        out.served_model_name = r.typed(top["served_model_name"][1], "served_model_name", (str,))
    seq = top["backends"][1]
    if not isinstance(seq, yaml.SequenceNode) or not seq.value:
        raise r.fail(seq, "'backends' must be a non-empty list")
    seen: dict[str, int] = {}
    for i, node in enumerate(seq.value):
        b = _backend(r, node)
        if b.name in seen:
            raise r.fail(node, f"backend name '{b.name}' is used twice (first on line {seen[b.name]})")
        seen[b.name] = b.line
        if b.priority is None:
            b.priority = i * 1000  # file order; explicit priorities group backends as equals
        out.backends.append(b)
    return out


def _backend(r: _Reader, node: yaml.Node) -> BackendConfig:
    if not isinstance(node, yaml.MappingNode):
        raise r.fail(node, "a backend must be a mapping with at least 'name' and 'type'")
    keys = {r.value(k): (k, v) for k, v in node.value}
    if "type" not in keys:
        raise r.fail(node, "backend has no 'type' (one of: native, openai)")
    kind = r.value(keys["type"][1])
    if kind not in BACKEND_TYPES:
        raise r.fail(keys["type"][1], f"unknown backend type {kind!r} (expected one of: {', '.join(BACKEND_TYPES)})")
    fields = r.mapping(node, f"a backend of type {kind}", _KEYS[kind])
    if "name" not in fields:
        raise r.fail(node, "backend has no 'name'")
    b = BackendConfig(name=r.typed(fields["name"][1], "name", (str,)), type=kind, line=node.start_mark.line + 1)
    for key in ("model", "quant", "draft", "images"):
        if key in fields:
            setattr(b, key, r.typed(fields[key][1], key, (str,)))
    if b.images not in IMAGE_POLICIES:
        raise r.fail(fields["images"][1], f"'images' must be one of: {', '.join(IMAGE_POLICIES)}; got {b.images!r}")
    for key in _NUMBERS:
        if key in fields:
            setattr(b, key, float(r.typed(fields[key][1], key, (int, float), 0)))
    for key, low, high in (("retries", 0, None), ("priority", 0, None), ("threads", 1, None),
                           ("max_model_len", 1, None), ("max_batch", 1, None), ("draft_tokens", 1, MAX_GUESS),
                           ("lookup", 0, MAX_GUESS)):
        if key in fields:
            setattr(b, key, r.typed(fields[key][1], key, (int,), low, high))
    for key, what in (("aliases", "requested model names to this backend's model names"),
                      ("lora", "adapter names to adapter folders")):
        if key in fields:
            node_ = fields[key][1]
            value = r.value(node_)
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
                raise r.fail(node_, f"'{key}' must map {what}")
            setattr(b, key, value)
    if "breaker" in fields:
        br = r.mapping(fields["breaker"][1], "'breaker'", {"failures", "cooldown"})
        if "failures" in br:
            b.breaker.failures = r.typed(br["failures"][1], "failures", (int,), 1)
        if "cooldown" in br:
            b.breaker.cooldown = float(r.typed(br["cooldown"][1], "cooldown", (int, float), 0))
    if kind == "openai":
        if "base_url" not in fields:
            raise r.fail(node, f"backend '{b.name}' of type openai has no 'base_url'")
        url = r.typed(fields["base_url"][1], "base_url", (str,))
        if not url.startswith(("http://", "https://")):
            raise r.fail(fields["base_url"][1], f"'base_url' must start with http:// or https://, got {url!r}")
        b.base_url = url.rstrip("/").removesuffix("/v1")
        if "api_key" in fields and "api_key_env" in fields:
            raise r.fail(fields["api_key_env"][0], "give either 'api_key' or 'api_key_env', not both")
        if "api_key" in fields:
            b.api_key = r.typed(fields["api_key"][1], "api_key", (str,))
        elif "api_key_env" in fields:
            var = r.typed(fields["api_key_env"][1], "api_key_env", (str,))
            b.api_key = os.environ.get(var)
            if not b.api_key:
                raise r.fail(fields["api_key_env"][1], f"environment variable {var} (api_key_env) is not set")
    elif b.model is None:
        raise r.fail(node, f"native backend '{b.name}' has no 'model' (a short name, hub id or path)")
    return b


def load_route(path: str | Path) -> RouteConfig:
    """Read and parse a route file (BadConfig when it is missing or invalid)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadConfig(f"cannot read route file {p}: {e.strerror or e}") from e
    return parse_route(text, str(p))
