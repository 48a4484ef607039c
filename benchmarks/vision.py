#!/usr/bin/env python
"""Vision-language speed: qwenkit against transformers on random weights of Qwen2.5-VL-3B and Qwen3-VL-2B.

    python benchmarks/vision.py                                    # both shapes, 3 repetitions
    python benchmarks/vision.py --shapes qwen3-vl-2b --reps 5
    python benchmarks/vision.py --quant int8                       # qwenkit's weights in int8 (the peer stays fp32)
    python benchmarks/vision.py --quick                            # tiny shapes, 1 repetition: a smoke test

Models. A random-weight checkpoint of each published shape (the config.json of Qwen/Qwen2.5-VL-3B-Instruct and
Qwen/Qwen3-VL-2B-Instruct, written out below), built once into <qwenkit cache>/bench/vision-<shape>/ as bf16
safetensors shards (tensor by tensor, so building never holds more than a shard), with the tiny tokenizer of
tests/tiny_vision.py (its ids, well below the 151,936-row vocabulary, are written into config.json as the image and
vision-start tokens) and the family's published preprocessor_config.json. Both engines load that folder: qwenkit with
qwenkit.load(folder, dtype=--dtype, quant=--quant), transformers with from_pretrained(dtype=float32) (bf16 values
are exact in fp32, so both run the same weights; a key transformers would initialise itself is an error).

Images. A 448x448 and a 1024x768 photo, cut (ImageOps.fit) and scaled from tests/fixtures/images, preprocessed with
the checkpoint's spec (qwenkit.media.image.preprocess; each family's default max_pixels). The prompt is one chat
turn, the image then a question, rendered and widened by qwenkit (prepared once, without weights; qwenkit's worker
checks that Model.prepare_chat gives the same ids and pixel values). transformers gets exactly those input ids,
pixel_values and image_grid_thw.

Measured, batch 1, greedy, --threads threads (default 2), per image:
- encode s: the vision tower alone (qwenkit: model.visual(pixel_values, grids); transformers:
  model.model.get_image_features(pixel_values, image_grid_thw));
- TTFT s: from submitting the prepared request to its first token, vision tower included (qwenkit: Model.stream
  through its engine, a fresh engine each time so the prefix cache holds nothing; transformers: generate with a
  streamer that timestamps tokens);
- decode tok/s: (--gen-tokens - 1) / time from the first token to the last of the same request (end-of-text
  ignored: stop_ids emptied / min_new_tokens).

How. Every (repetition, engine) runs in its own worker process (this script with --_task), which loads the model,
warms up (a 224x224 image encoded and answered with 2 tokens, not counted), measures both images and exits, so the
two engines' copies of a model are never in memory together. Repetitions alternate engines, the order rotated each
time. Before each measurement the worker waits until the CPUs are idle (busy share over 1 s, from /proc/stat); a
measurement during which other processes used more than --idle-threshold of the CPUs is retried (--max-retries),
then kept and flagged (*). Medians over --reps. Peak RSS is each worker's VmHWM (load included).

Results: a table with the speed-ups (encode and TTFT: transformers s / qwenkit s, the issue's target is >= 2x;
decode: qwenkit tok/s / transformers tok/s) on stdout, and everything (every repetition) in JSON (--out, default
benchmarks/results/vision-<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    TimingStreamer, cpu_jiffies, machine_info, proc_status, process_jiffies, result_path, wait_for_idle)

ENGINES = ("qwenkit", "transformers")
RECIPE = "v1"  # bump when the random checkpoint's recipe changes, so cached folders are rebuilt
SHARD_BYTES = 2 << 30  # bf16 shard size: building holds one shard (and one fp32 tensor) at a time
WORKER_TIMEOUT_S = 3 * 3600
FIXTURES = ROOT / "tests" / "fixtures" / "images"
QUESTION = "What is in this picture? Answer in one sentence."

# (name, fixture, width, height): the measured photos, and the warm-up image (not counted).
PHOTOS = [("448x448", "chelsea_exif6.jpg", 448, 448), ("1024x768", "coffee_wide.webp", 1024, 768)]
WARMUP = ("warmup", "astronaut_tall.png", 224, 224)

# Qwen/Qwen2.5-VL-3B-Instruct config.json as published (its decoder's fields at the top level, rope_scaling mrope).
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 128000, "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Qwen/Qwen3-VL-2B-Instruct config.json as published (text_config / vision_config nested).
QWEN3_VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": True,
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "dtype": "bfloat16", "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}

SHAPES = {"qwen2.5-vl-3b": ("qwen2_5_vl", QWEN25_VL_3B), "qwen3-vl-2b": ("qwen3_vl", QWEN3_VL_2B)}
QUICK_SHAPES = {"tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}  # tests/tiny_vision.py's configs
TRANSFORMERS_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                        "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def say(*parts) -> None:
    print(*parts, flush=True)


def bench_dir() -> Path:
    from qwenkit.hub.cache import home

    return home() / "bench"


# ==== the random checkpoint ==========================================================================================

def _tiny_ids(family: str) -> dict:
    """The special-token ids of tests/tiny_vision.py's tokenizer, under config.json's names."""
    from tests.tiny_vision import tiny_vl_config

    tiny = tiny_vl_config(family)
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
            "eos_token_id")
    return {k: tiny[k] for k in keys}


def checkpoint_config(family: str, published: dict) -> dict:
    """The published config.json with the tiny tokenizer's ids in place of the real tokenizer's."""
    config = json.loads(json.dumps(published))
    ids = _tiny_ids(family)
    config.update(ids)
    if "vision_token_id" in config:  # Qwen2.5-VL's unused <|vision_pad|>: any id the tokenizer does not give out
        config["vision_token_id"] = ids["video_token_id"] + 1
    if "text_config" in config:
        config["text_config"].update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    return config


def preprocessor_config(family: str) -> dict:
    """The family's published preprocessor_config.json (qwenkit.media.image.QWEN25_VL / QWEN3_VL)."""
    from qwenkit.media.image import QWEN3_VL, QWEN25_VL

    spec = QWEN3_VL if family == "qwen3_vl" else QWEN25_VL
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255,
            "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
            "merge_size": spec.merge_size, "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
            "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}


def random_tensor(name: str, shape: tuple[int, ...], seed: int):
    """A deterministic random tensor for one parameter (seeded by its name), float32: weight matrices (and the
    patch convolution, position table) N(0, 0.02), norm scales 1 + N(0, 0.02), biases N(0, 0.02)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=gen).mul_(0.02)
    if len(shape) == 1 and name.endswith(".weight"):
        x.add_(1.0)
    return x


def build_folder(family: str, config: dict, dest: Path, seed: int, preprocessor: dict | None,
                 shard_bytes: int = SHARD_BYTES) -> None:
    """Write a complete loadable folder (config, bf16 safetensors shards and index, tokenizer, preprocessor) to
    dest, via dest.partial so that an interrupted build is never used."""
    import torch
    from safetensors.torch import save_file

    from qwenkit.checkpoint.names import released_name
    from qwenkit.model.config import ModelConfig
    from qwenkit.model.qwen import QwenForCausalLM
    from tests.tiny_vision import tiny_vl_folder

    part = dest.with_name(dest.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    tiny = tiny_vl_folder(part / "_tiny", family)  # its tokenizer, chat template and generation config
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, part / name)
    if preprocessor is None:
        shutil.copy(tiny / "preprocessor_config.json", part / "preprocessor_config.json")
    else:
        (part / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    shutil.rmtree(tiny)
    (part / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    with torch.device("meta"):  # names and shapes only
        net = QwenForCausalLM(ModelConfig.from_dict(config, source="benchmark config"))
    tensors = [(released_name(k, family), tuple(v.shape)) for k, v in net.state_dict().items()]
    del net
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out = {}
        for name, shape in shard:
            out[name] = random_tensor(name, shape, seed).to(torch.bfloat16)
            weight_map[name] = file
            total += out[name].nbytes
        save_file(out, str(part / file), metadata={"format": "pt"})
        del out
        say(f"    wrote {file} ({i + 1} of {len(shards)})")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (part / "bench.json").write_text(json.dumps({"recipe": RECIPE, "seed": seed, "family": family}), encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    part.rename(dest)


def ensure_folder(shape: str, args, workdir: Path) -> Path:
    """The random checkpoint of a shape: cached for the real shapes, in workdir for --quick's tiny ones. Built in a
    subprocess, so this process never holds torch's heap of it."""
    if args.quick:
        dest = workdir / f"vision-{shape}"
    else:
        dest = bench_dir() / f"vision-{shape}"
        marker = dest / "bench.json"
        if marker.exists() and json.loads(marker.read_text()).get("recipe") == RECIPE:
            return dest
    say(f"  building random weights of {shape} into {dest}")
    started = time.perf_counter()
    run_task(["--_task", "build", "--_shape", shape, "--_folder", str(dest), "--seed", str(args.seed)]
             + (["--quick"] if args.quick else []), timeout=WORKER_TIMEOUT_S)
    say(f"  built in {time.perf_counter() - started:.0f} s")
    return dest


def build_task(args) -> None:
    if args.quick:
        from tests.tiny_vision import tiny_vl_config

        family = QUICK_SHAPES[args._shape]
        # Small shards, so that the quick run reads a sharded folder as the real shapes do.
        build_folder(family, tiny_vl_config(family), Path(args._folder), args.seed, None, shard_bytes=64 << 10)
    else:
        family, published = SHAPES[args._shape]
        build_folder(family, checkpoint_config(family, published), Path(args._folder), args.seed,
                     preprocessor_config(family))


# ==== the photos and the prompt ======================================================================================

def make_photos(dest: Path) -> dict[str, Path]:
    """The measured photos (and the warm-up image) as PNG files: a fixture, upright, cut to the aspect ratio and
    scaled (LANCZOS) to the size. Deterministic; rewritten each run (milliseconds)."""
    from PIL import Image, ImageOps

    from qwenkit.media.image import load_image

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fixture, width, height in [WARMUP, *PHOTOS]:
        src = FIXTURES / fixture
        image = load_image(src.read_bytes(), source=str(src))
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
        out[name] = dest / f"{name}.png"
        image.save(out[name])
    return out


def messages(photo: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(photo)}},
                                         {"type": "text", "text": QUESTION}]}]


def prepare_task(args) -> None:
    """Prompt ids, pixel values and grid of each photo, as Model.prepare_chat makes them, computed without loading
    the weights (the checkpoint's tokenizer, chat template and image spec); saved for both workers."""
    import torch

    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.media.image import load_image, preprocess
    from qwenkit.model.vision import num_image_tokens
    from qwenkit.text.chat import ChatTemplate

    checkpoint = open_checkpoint(Path(args._folder))
    tokenizer = checkpoint.tokenizer()

    def text_of(token_id):
        return None if token_id is None else tokenizer.id_to_token(token_id)

    template = ChatTemplate(tokenizer.chat_template, bos_token=text_of(tokenizer.bos_token_id),
                            eos_token=text_of(tokenizer.eos_token_id))
    spec = checkpoint.image_spec()
    image_token = checkpoint.config.image_token_id
    photos = json.loads(args._photos)
    out = {}
    for name, path in photos.items():
        ids = tokenizer.encode(template.render(messages(Path(path)), add_generation_prompt=True, vision=True))
        started = time.perf_counter()
        pixels, grid = preprocess(load_image(Path(path).read_bytes(), source=path), spec, source=path)
        preprocess_s = time.perf_counter() - started
        n = num_image_tokens(grid, spec.merge_size)
        if ids.count(image_token) != 1:
            raise RuntimeError(f"the chat template rendered {ids.count(image_token)} image placeholders, expected 1")
        at = ids.index(image_token)
        ids = ids[:at] + [image_token] * n + ids[at + 1:]
        out[name] = {"prompt_ids": ids, "pixel_values": pixels, "grid": grid, "image_tokens": n,
                     "preprocess_s": preprocess_s, "path": path}
    torch.save(out, args._inputs)


# ==== workers: one process per (engine, repetition) ===================================================================

class Measure:
    """Timed sections on idle CPUs: wait for idle, run, account other processes' CPU use, retry if contended."""

    def __init__(self, args):
        self.args = args

    def __call__(self, label: str, fn):
        args, retries = self.args, 0
        while True:
            waited, busy = (0.0, None) if args.allow_busy else wait_for_idle(args.idle_threshold, args.max_wait, say)
            b0, t0 = cpu_jiffies()
            s0 = process_jiffies()
            out = fn()
            b1, t1 = cpu_jiffies()
            s1 = process_jiffies()
            other = max(0, (b1 - b0) - (s1 - s0)) / max(t1 - t0, 1)
            # A section shorter than ~50 clock ticks of all CPUs (a quarter of a second on two) is too short to tell.
            out.update(other_cpu_share=other, busy_before=busy, waited_s=waited, retries=retries,
                       contended=t1 - t0 >= 50 and other > args.idle_threshold)
            if not out["contended"] or args.allow_busy or retries >= args.max_retries:
                return out
            retries += 1
            say(f"      {label}: other processes took {other:.0%} of the CPUs; retrying")


class OursWorker:
    def __init__(self, args):
        import torch

        import qwenkit

        started = time.perf_counter()
        self.m = qwenkit.load(args._folder, dtype=getattr(torch, args.dtype), threads=args.threads, quant=args.quant,
                              pull=False)
        self.torch, self.gen = torch, args.gen_tokens
        self.info = {"load_s": time.perf_counter() - started, "dtype": str(self.m.model.dtype), "quant": args.quant,
                     "threads": torch.get_num_threads(), "version": qwenkit.__version__}

    def check_inputs(self, name: str, photo: Path, inputs: dict) -> float:
        """Model.prepare_chat's prompt and pixels must be the ones the peer gets. Returns its time."""
        started = time.perf_counter()
        p = self.m.prepare_chat(messages(photo), temperature=0)
        prepare_s = time.perf_counter() - started
        if p.prompt_ids != inputs["prompt_ids"]:
            raise RuntimeError(f"{name}: Model.prepare_chat's prompt ids differ from the benchmark's")
        if len(p.images) != 1 or p.images[0].grid != tuple(inputs["grid"]) or \
                not self.torch.equal(p.images[0].pixel_values, inputs["pixel_values"]):
            raise RuntimeError(f"{name}: Model.prepare_chat's pixel values differ from the benchmark's")
        return prepare_s

    def encode(self, inputs: dict) -> dict:
        tower = self.m.model.visual
        started = time.perf_counter()
        with self.torch.inference_mode():
            features = tower(inputs["pixel_values"].to(tower.dtype), [tuple(inputs["grid"])])
        return {"encode_s": time.perf_counter() - started, "features": int(features.embeds.shape[0])}

    def generate(self, photo: Path, gen: int) -> dict:
        p = self.m.prepare_chat(messages(photo), temperature=0)
        p.stop_ids, p.max_new_tokens = set(), gen  # random weights: run the full length
        self.m.start_engine(max_batch=1)  # a fresh engine: an empty prefix cache
        times, tokens, last = [], [], None
        started = time.perf_counter()
        for step in self.m.stream(self.m.request(p)):
            if step.tokens:
                now = time.perf_counter()
                times += [now] * len(step.tokens)
                tokens += step.tokens
            last = step
        return timings(started, times, tokens, gen) | {"reported_ttft_s": last.time_to_first_token,
                                                      "reported_decode_tps": last.generation_tps}


class PeerWorker:
    def __init__(self, args):
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        transformers.utils.logging.disable_progress_bar()
        family = json.loads((Path(args._folder) / "config.json").read_text())["model_type"]
        cls = getattr(transformers, TRANSFORMERS_CLASSES[family])
        started = time.perf_counter()
        self.model, loading = cls.from_pretrained(args._folder, dtype=torch.float32, output_loading_info=True)
        self.model.eval()
        bad = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise RuntimeError(f"transformers did not load the checkpoint cleanly: {bad}")
        self.torch, self.image_token = torch, self.model.config.image_token_id
        self.info = {"load_s": time.perf_counter() - started, "dtype": "torch.float32",
                     "threads": torch.get_num_threads(),
                     "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                     "version": transformers.__version__}

    def _inputs(self, inputs: dict) -> dict:
        torch = self.torch
        ids = torch.tensor([inputs["prompt_ids"]])
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                    image_grid_thw=torch.tensor([inputs["grid"]]), mm_token_type_ids=(ids == self.image_token).int())

    def encode(self, inputs: dict) -> dict:
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.model.get_image_features(inputs["pixel_values"], self.torch.tensor([inputs["grid"]]))
        pooled = getattr(out, "pooler_output", out)
        rows = sum(int(t.shape[0]) for t in pooled) if isinstance(pooled, (list, tuple)) else int(pooled.shape[0])
        return {"encode_s": time.perf_counter() - started, "features": rows}

    def generate(self, inputs: dict, gen: int) -> dict:
        streamer = TimingStreamer()
        started = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(**self._inputs(inputs), max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                                streamer=streamer, pad_token_id=0, temperature=None, top_p=None, top_k=None)
        return timings(started, streamer.times, streamer.tokens, gen)


def timings(started: float, times: list[float], tokens: list[int], gen: int) -> dict:
    if len(tokens) != gen:
        raise RuntimeError(f"generated {len(tokens)} tokens, expected {gen}")
    decode_s = times[-1] - times[0]
    return {"ttft_s": times[0] - started, "decode_s": decode_s,
            "decode_tps": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None,
            "tokens": tokens[:16]}


def engine_task(args) -> None:
    """Load one engine, warm up, measure every photo; the result is the last stdout line (RESULT <json>)."""
    import torch

    inputs = torch.load(args._inputs, weights_only=False)
    photos = json.loads(args._photos)
    ours = args._task == "qwenkit"
    worker = OursWorker(args) if ours else PeerWorker(args)
    measure = Measure(args)
    result = {"info": worker.info, "photos": {}}

    def encode(name):
        return worker.encode(inputs[name])

    def generate(name, gen):
        return worker.generate(Path(photos[name]), gen) if ours else worker.generate(inputs[name], gen)

    started = time.perf_counter()
    encode(WARMUP[0])
    generate(WARMUP[0], 2)
    result["info"]["warmup_s"] = time.perf_counter() - started
    for name, *_ in PHOTOS:
        row = result["photos"][name] = {}
        if ours:
            row["prepare_chat_s"] = worker.check_inputs(name, Path(photos[name]), inputs[name])
        row["encode"] = measure(f"{name} encode", lambda: encode(name))
        row["generate"] = measure(f"{name} generate", lambda: generate(name, args.gen_tokens))
        say(f"      {args._task} {name}: encode {row['encode']['encode_s']:.2f} s, TTFT "
            f"{row['generate']['ttft_s']:.2f} s, decode {row['generate']['decode_tps'] or 0:.2f} tok/s")
    result["info"]["peak_rss_bytes"] = proc_status("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


# ==== the orchestrator ================================================================================================

def run_task(extra: list[str], timeout: float) -> dict | None:
    """This script in a subprocess; its stderr passes through, the RESULT line of its stdout is returned."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    done = subprocess.run(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, text=True, timeout=timeout)
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(line, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra[:2])} failed (exit {done.returncode}); see its output above")
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def run_shape(shape: str, args, workdir: Path, photos: dict[str, Path]) -> dict:
    folder = ensure_folder(shape, args, workdir)
    inputs = workdir / f"inputs-{shape}.pt"
    photo_arg = json.dumps({k: str(v) for k, v in photos.items()})
    common = ["--_folder", str(folder), "--_photos", photo_arg, "--_inputs", str(inputs)]
    run_task(["--_task", "prepare", *common], timeout=600)
    import torch

    prepared = torch.load(inputs, weights_only=False)
    engines = [e for e in ENGINES if e in args.engines]
    flags = ["--threads", str(args.threads), "--gen-tokens", str(args.gen_tokens), "--dtype", args.dtype,
             "--quant", args.quant, "--idle-threshold", str(args.idle_threshold), "--max-wait", str(args.max_wait),
             "--max-retries", str(args.max_retries)] + (["--allow-busy"] if args.allow_busy else [])
    reps: dict[str, list[dict]] = {e: [] for e in engines}
    errors: dict[str, str] = {}
    for rep in range(args.reps):
        order = engines[rep % len(engines):] + engines[:rep % len(engines)]
        for engine in order:
            if engine in errors:
                continue
            say(f"  {shape}: repetition {rep + 1} of {args.reps}, {engine}")
            try:
                reps[engine].append(run_task(["--_task", engine, *common, *flags], timeout=WORKER_TIMEOUT_S))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors[engine] = str(e)
                say(f"  {engine} failed: {e}")
    out = {"folder": str(folder), "errors": errors, "engines": {}, "photos": {}}
    for engine in engines:
        runs = reps[engine]
        if runs:
            out["engines"][engine] = {"info": [r["info"] for r in runs],
                                      "peak_rss_bytes": max(r["info"]["peak_rss_bytes"] for r in runs),
                                      "load_s": median(r["info"]["load_s"] for r in runs)}
    for name, *_ in PHOTOS:
        p = prepared[name]
        row = out["photos"][name] = {"grid": list(p["grid"]), "image_tokens": p["image_tokens"],
                                     "prompt_tokens": len(p["prompt_ids"]), "preprocess_s": p["preprocess_s"]}
        for engine in engines:
            runs = [r["photos"][name] for r in reps[engine]]
            if not runs:
                continue
            row[engine] = {
                "encode_s": median(r["encode"]["encode_s"] for r in runs),
                "ttft_s": median(r["generate"]["ttft_s"] for r in runs),
                "decode_tps": median(r["generate"]["decode_tps"] for r in runs),
                "contended": any(r["encode"]["contended"] or r["generate"]["contended"] for r in runs),
                "tokens": runs[-1]["generate"]["tokens"],
                "reps": runs,
            }
        if all(e in row for e in ENGINES):
            ours, peer = row["qwenkit"], row["transformers"]
            row["encode_speedup"] = ratio(peer["encode_s"], ours["encode_s"])
            row["ttft_speedup"] = ratio(peer["ttft_s"], ours["ttft_s"])
            row["decode_ratio"] = ratio(ours["decode_tps"], peer["decode_tps"])
            row["same_first_token"] = ours["tokens"][:1] == peer["tokens"][:1]
    return out


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(result: dict) -> None:
    say(f"\n{'shape':16} {'image':9} {'img tok':>7} | {'encode s':>8} {'hf':>8} {'x':>6} | {'TTFT s':>8} "
        f"{'hf':>8} {'x':>6} | {'dec tok/s':>9} {'hf':>7} {'x':>6}")
    for shape, s in result["shapes"].items():
        for name, row in s["photos"].items():
            ours, peer = row.get("qwenkit", {}), row.get("transformers", {})
            flag = "*" if ours.get("contended") or peer.get("contended") else " "
            say(f"{shape:16} {name:9} {row['image_tokens']:>7} | {fmt(ours.get('encode_s'), '8.3f'):>8} "
                f"{fmt(peer.get('encode_s'), '8.3f'):>8} {times(row.get('encode_speedup')):>6} | "
                f"{fmt(ours.get('ttft_s'), '8.3f'):>8} {fmt(peer.get('ttft_s'), '8.3f'):>8} "
                f"{times(row.get('ttft_speedup')):>6} | {fmt(ours.get('decode_tps'), '9.2f'):>9} "
                f"{fmt(peer.get('decode_tps'), '7.2f'):>7} {times(row.get('decode_ratio')):>6}{flag}")
    say("x: encode and TTFT transformers s / qwenkit s (target >= 2x), decode qwenkit / transformers tok/s; "
        "* a measurement other processes disturbed")
    for shape, s in result["shapes"].items():
        mem = ", ".join(f"{e} peak {v['peak_rss_bytes'] / 2**30:.1f} GiB, load {v['load_s']:.0f} s"
                        for e, v in s["engines"].items())
        say(f"{shape}: {mem}")
        for engine, error in s["errors"].items():
            say(f"{shape}: {engine} FAILED: {error}")
    rows = [r for s in result["shapes"].values() for r in s["photos"].values() if "encode_speedup" in r]
    if rows:
        met = all(r["encode_speedup"] >= 2 and r["ttft_speedup"] >= 2 for r in rows)
        note = " (tiny shapes: overheads only, not the target's measure)" if result["quick"] else ""
        say(f"target (encode and first token >= 2x faster than transformers): {'met' if met else 'NOT met'}{note}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help="qwenkit, transformers or both")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per request (decode speed)")
    ap.add_argument("--quant", default="auto", choices=("none", "int8", "int4", "auto"),
                    help="qwenkit's weights (transformers always runs fp32)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="qwenkit's dtype")
    ap.add_argument("--seed", type=int, default=0, help="of the random weights")
    ap.add_argument("--idle-threshold", type=float, default=0.15,
                    help="busy share of all CPUs under which they count as idle, and over which other processes' "
                         "use during a measurement makes it retried")
    ap.add_argument("--max-wait", type=float, default=300, help="seconds to wait for idle CPUs, then measure")
    ap.add_argument("--max-retries", type=int, default=1)
    ap.add_argument("--allow-busy", action="store_true", help="do not wait for idle CPUs nor retry")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tests/tiny_vision.py's tiny shapes, 1 repetition, no idle waits")
    ap.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/vision-<date>.json)")
    for hidden in ("--_task", "--_shape", "--_folder", "--_photos", "--_inputs"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick and not args._task:
        args.reps, args.allow_busy = 1, True
        args.shapes = ",".join(QUICK_SHAPES)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in args.engines:
        if engine not in ENGINES:
            ap.error(f"--engines: unknown engine {engine!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._task:
        try:
            {"build": build_task, "prepare": prepare_task, "qwenkit": engine_task,
             "transformers": engine_task}[args._task](args)
        except Exception:
            traceback.print_exc()
            return 1
        return 0

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    known = QUICK_SHAPES if args.quick else SHAPES
    for shape in shapes:
        if shape not in known:
            raise SystemExit(f"--shapes: unknown shape {shape!r} (known: {', '.join(known)})")
    out = args.out or result_path("vision-quick" if args.quick else "vision")
    result = {"machine": machine_info(("torch", "transformers", "safetensors", "pillow", "numpy")),
              "threads": args.threads, "reps": args.reps, "gen_tokens": args.gen_tokens,
              "quant": args.quant, "dtype": args.dtype, "quick": args.quick, "question": QUESTION,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="qwenkit-vision-bench-") as tmp:
        workdir = Path(tmp)
        photos = make_photos(workdir / "photos")
        for shape in shapes:
            say(f"{shape}:")
            result["shapes"][shape] = run_shape(shape, args, workdir, photos)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))  # kept if a later shape fails
    print_table(result)
    out.write_text(json.dumps(result, indent=2))
    say(f"wrote {out}")
    failed = any(s["errors"] for s in result["shapes"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
