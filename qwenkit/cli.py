"""The `qwenkit` command. Each verb is a thin call into a package; user errors become one-line messages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from qwenkit.errors import QwenkitError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, help="0 for greedy decoding (default: the model's own)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="same seed, same answer")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: up to the context)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _quant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=("f16", "f32"),
                   help="keys and values in the KV cache (default: f16 for a float32 model, as llama.cpp)")
    p.add_argument(
        "--quant",
        choices=("auto", "int8", "int4", "none"),
        default="auto",
        help="weight format: auto keeps a GGUF file's quantized weights compact and exact (default); int8/int4 "
        "quantize every linear layer; none runs fp32",
    )


def _speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="MODEL", help="speculative decoding: a smaller model of the same vocabulary "
                   "guesses tokens that the model checks (same text when greedy, same distribution when sampled)")
    p.add_argument("--draft-tokens", type=_guess_count, default=4, metavar="N",
                   help="tokens the draft guesses a step, at most (default 4)")
    p.add_argument("--lookup", type=_guess_count, default=0, metavar="N",
                   help="speculative decoding by prompt lookup: guess up to N tokens a step by copying what followed "
                   "the last few tokens earlier in the prompt or answer (code edits, quoting, translation)")


def _guess_count(text: str) -> int:
    from qwenkit.engine.speculative import MAX_GUESS

    value = _positive(text)
    if value > MAX_GUESS:
        raise argparse.ArgumentTypeError(f"at most {MAX_GUESS}, got {value}")
    return value


def _sampling(args: argparse.Namespace) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenkit", description="Run open-weight Qwen models on this machine.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = sub.add_parser("run", help="answer a prompt (streamed), or chat interactively without one")
    run.add_argument("model", help="short name (qwen2.5-coder:0.5b), Hugging Face id, or path to .gguf / folder")
    run.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from stdin; omit for interactive chat")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                     help="an image the prompt is about (JPEG, PNG or WebP; repeatable; a vision-language model)")
    run.add_argument("--mmproj", metavar="GGUF", help="the vision tower of a llama.cpp VL model's GGUF "
                     "(default: the one mmproj*.gguf beside the model file, if any)")
    # also after the verb (`qwenkit run -v ...`); SUPPRESS keeps a `qwenkit -v run` count when it is absent here
    run.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                     help="log more, and print the kernel plan first")
    run.add_argument("--think", dest="think", action="store_true", default=None, help="let Qwen3 models reason")
    run.add_argument("--no-think", dest="think", action="store_false", help="turn Qwen3 reasoning off")
    run.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per physical core)")
    run.add_argument("--quiet-stats", action="store_true", help="do not print speed statistics to stderr")
    _quant_arg(run)
    _speculation_args(run)
    _sampling_args(run)

    pull = sub.add_parser("pull", help="download a model into the cache (sha256-checked)")
    pull.add_argument("model")
    sub.add_parser("list", help="list cached models")
    rm = sub.add_parser("rm", help="remove a cached model")
    rm.add_argument("model")
    info = sub.add_parser("info", help="architecture, parameters, tensor types and context length of a model")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--kernels", action="store_true",
                      help="the kernel plan: which kernel each kind of layer runs on this CPU")
    _quant_arg(info)

    bench = sub.add_parser("bench", help="measure prompt and decode tokens/s and peak memory")
    bench.add_argument("model")
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--gen-tokens", type=int, default=128)
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--json", action="store_true")
    _quant_arg(bench)
    _speculation_args(bench)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("model", nargs="?", help="short name, Hugging Face id, or path to .gguf / folder")
    srv.add_argument("--route", metavar="ROUTE_YAML",
                     help="serve a router over the backends in this YAML file instead of one model "
                     "(hosted first, on-device fallback; see qwenkit/route/config.py)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("QWENKIT_API_KEY") or None,
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                     "(default: $QWENKIT_API_KEY)")
    srv.add_argument("--served-model-name", help="the model id clients use (default: MODEL as given)")
    srv.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (default: 8)")
    srv.add_argument("--max-queue", type=_positive, default=64,
                     help="requests waiting for the batch before new ones get 429 (default: 64)")
    srv.add_argument("--max-model-len", type=_positive, help="tokens per request, prompt plus answer "
                     "(default: the model's context length)")
    srv.add_argument("--request-timeout", type=float, help="seconds a request may take (default: no limit)")
    srv.add_argument("--max-body-bytes", type=_positive, default=16 << 20,
                     help="request body cap (default: 16 MiB: room for a phone photo as a data: URL)")
    srv.add_argument("--mmproj", metavar="GGUF", help="the vision tower of a llama.cpp VL model's GGUF "
                     "(default: the one mmproj*.gguf beside the model file, if any)")
    srv.add_argument("--allow-image-urls", action="store_true",
                     help="fetch http(s) image URLs named in chat requests (default: data: URLs only)")
    srv.add_argument("--drain-timeout", type=float, default=300.0,
                     help="seconds SIGTERM waits for requests in flight (default: 300)")
    srv.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per physical core)")
    srv.add_argument("--lora", action="append", default=[], type=_lora, metavar="NAME=PATH",
                     help="serve a LoRA adapter (PEFT folder) over the model; requests choose it with model=NAME "
                     "(repeatable)")
    _quant_arg(srv)
    _speculation_args(srv)

    from qwenkit.apps.assistant.cli import add_arguments

    add_arguments(sub.add_parser("assistant", help="a tool-using assistant: directions, places, weather, web search, "
                                 "drafts and MCP tools"))

    from qwenkit.apps.translate.cli import add_arguments as translate_arguments

    translate_arguments(sub.add_parser("translate", help="live captions: speech (a file, PCM on stdin, a microphone) "
                                       "to translated text; or text lines with --text"))

    from qwenkit.tune.cli import add_arguments as tune_arguments

    tune_arguments(sub.add_parser("tune", help="fine-tune a LoRA adapter on chat data (PEFT format)"))
    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model (a Hugging Face folder)")
    merge.add_argument("base", help="the base model's Hugging Face folder")
    merge.add_argument("adapter", help="the adapter folder (qwenkit tune's or peft's)")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    export = sub.add_parser("export", help="write a model (with an adapter folded in) as a GGUF file")
    export.add_argument("model", help="short name, Hugging Face id, or path to .gguf / folder")
    export.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write")
    export.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"), help="weight type (default f16)")
    export.add_argument("--adapter", help="a LoRA adapter folder to merge first")
    return parser


def _lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return VERBS[args.verb](args) or 0
    except QwenkitError as e:
        print(f"qwenkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a program that stopped reading (`| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _load(args: argparse.Namespace):
    """The model of `run` or `bench`, its engine started with the command's KV dtype."""
    import qwenkit
    from qwenkit.engine.engine import kv_dtype
    from qwenkit.runtime import speculation_for

    model = qwenkit.load(args.model, threads=args.threads, quant=args.quant, mmproj=getattr(args, "mmproj", None))
    speculation = speculation_for(model, draft=args.draft, lookup=args.lookup, draft_tokens=args.draft_tokens,
                                  quant=args.quant, threads=args.threads)
    model.start_engine(kv_dtype=kv_dtype(args.kv_dtype), speculation=speculation)
    if args.verbose:
        print(model.describe_kernels(), file=sys.stderr)
    return model


def cmd_run(args: argparse.Namespace) -> int:
    from qwenkit.cli_chat import answer_once, interactive

    model = _load(args)
    sampling = _sampling(args)
    if args.prompt is None:
        if args.image:
            raise QwenkitError("--image needs a prompt (interactive chat takes text only)")
        return interactive(model, args.system, args.think, sampling)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.image and not model.takes_images:
        raise QwenkitError(f"--image: {args.model} is a text-only model (images need Qwen2.5-VL or Qwen3-VL)")
    content = [{"type": "image_url", "image_url": {"url": image}} for image in args.image]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": [*content, {"type": "text", "text": prompt}] if content else prompt}
    ]
    answer_once(model, messages, args.think, sampling, stats=not args.quiet_stats)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from qwenkit import hub

    path = hub.pull(args.model, progress=sys.stderr.isatty())
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qwenkit import hub

    models = hub.list_models()
    if not models:
        print("no models cached (try: qwenkit pull qwen2.5-coder:0.5b)", file=sys.stderr)
        return 0
    print(f"{'NAME':40} {'SIZE':>10}  PATH")
    for m in models:
        print(f"{m.ref:40} {m.size / 1e9:>8.2f}GB  {m.path}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from qwenkit import hub

    print(f"removed {hub.remove(args.model)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qwenkit import hub
    from qwenkit.checkpoint import open_checkpoint

    path = hub.resolve(args.model)
    ckpt = open_checkpoint(path)
    c = ckpt.config
    facts = {
        "path": str(path),
        "format": ckpt.kind,
        "architecture": c.model_type,
        "parameters": ckpt.parameter_count(),
        "context_length": c.max_position_embeddings,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "tensor_types": ckpt.tensor_types(),
    }
    if c.is_moe:
        facts["experts"] = f"{c.num_experts_per_tok} of {c.num_experts}"
    if c.vision is not None:
        v = c.vision
        facts["vision"] = (f"{v.family} tower, {v.depth} blocks, width {v.hidden_size}, {v.num_heads} heads, "
                           f"{v.patch_size}px patches merged {v.spatial_merge_size}x{v.spatial_merge_size}"
                           + (f", DeepStack after blocks {v.deepstack_visual_indexes}" if v.deepstack_visual_indexes
                              else f", windows of {v.window_size}px"))
    if args.kernels:
        from qwenkit.quant.plan import KernelPlan

        facts["kernels"] = KernelPlan.detect().describe(ckpt.tensors(), args.quant).splitlines()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key, value in facts.items():
        if key == "parameters":
            value = f"{value / 1e9:.2f}B ({value:,})"
        elif key == "tensor_types":
            value = ", ".join(f"{k} x{n}" for k, n in sorted(value.items()))
        elif key == "kernels":
            print("kernels:\n  " + "\n  ".join(value))
            continue
        print(f"{key.replace('_', ' '):16} {value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qwenkit.bench import run_bench

    model = _load(args)
    r = run_bench(model, args.prompt_tokens, args.gen_tokens, args.reps)
    if args.json:
        print(json.dumps(r.__dict__ | {"model": args.model, "load_seconds": model.load_seconds}))
        return 0
    print(f"model         {args.model} ({model.config.model_type}, quant {args.quant}, {r.threads} threads)")
    print(f"prompt        {r.prompt_tps:8.1f} tokens/s  ({r.prompt_tokens} tokens, median of {args.reps})")
    print(f"decode        {r.decode_tps:8.1f} tokens/s  ({r.gen_tokens} tokens, median of {args.reps})")
    print(f"peak memory   {r.peak_memory_gb:8.2f} GB")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qwenkit.serve import ServeConfig
    from qwenkit.serve.server import serve

    if args.route:
        if args.model:
            raise QwenkitError("serve: give either a MODEL or --route, not both (the route file names the models)")
        from qwenkit.serve.route_app import serve_route

        return serve_route(args.route, host=args.host, port=args.port, api_key=args.api_key, verbose=args.verbose)
    if not args.model:
        raise QwenkitError("serve: a MODEL (or --route ROUTE_YAML) is required")
    config = ServeConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
        quant=args.quant, threads=args.threads, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout, lora=_lora_map(args.lora),
        kv_dtype=args.kv_dtype, draft=args.draft, draft_tokens=args.draft_tokens, lookup=args.lookup,
        allow_image_urls=args.allow_image_urls, mmproj=args.mmproj,
    )
    return serve(config, verbose=args.verbose)


def _lora_map(pairs: list[tuple[str, str]]) -> dict[str, str]:
    names = [name for name, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise QwenkitError(f"--lora: adapter name {twice[0]!r} given twice")
    return dict(pairs)


def cmd_assistant(args: argparse.Namespace) -> int:
    from qwenkit.apps.assistant.cli import run

    return run(args)


def cmd_translate(args: argparse.Namespace) -> int:
    from qwenkit.apps.translate.cli import run

    return run(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from qwenkit.tune.cli import run

    return run(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwenkit.tune.merge import merge_to_folder

    print(merge_to_folder(Path(args.base), Path(args.adapter), Path(args.out)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwenkit import hub
    from qwenkit.tune.export import export_gguf

    adapter = Path(args.adapter) if args.adapter else None
    written = export_gguf(hub.resolve(args.model), Path(args.gguf), args.type, adapter, progress=sys.stderr.isatty())
    print("\n".join(str(path) for path in written))
    return 0


VERBS = {"run": cmd_run, "pull": cmd_pull, "list": cmd_list, "rm": cmd_rm, "info": cmd_info, "bench": cmd_bench,
         "serve": cmd_serve, "assistant": cmd_assistant, "translate": cmd_translate, "tune": cmd_tune,
         "merge": cmd_merge, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
