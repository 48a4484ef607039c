"""Checkpoints on disk: open one (GGUF file or Hugging Face folder), read its config, tokenizer and defaults, and
load its weights into a model. Opening is cheap (headers and JSON only); `load_model` reads the weights."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qwenkit.checkpoint.loader import checkpoint_kind, load_gguf, load_hf
from qwenkit.errors import BadCheckpoint
from qwenkit.model.config import GGUF_VL_ARCHITECTURES, ModelConfig

# GGUF metadata the tokenizer is built from and nothing else reads (the per-token arrays)
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")


# Qwen's recommended sampling (DESIGN.md section 2) where a checkpoint carries no generation_config.json.
QWEN_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20)
QWEN3_THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20)
QWEN_STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@dataclass
class Checkpoint:
    path: Path
    kind: str  # "gguf" or "hf"
    config: ModelConfig
    _gguf: Any = None
    _tokenizer: Any = None
    _weights: Any = None
    mmproj: Any = None  # a VL GGUF's vision tower (qwenkit.checkpoint.mmproj.Mmproj), or None: text only

    def load_model(self, dtype: torch.dtype = torch.float32, quant: str = "none"):
        """The model with weights in `dtype`; `quant` (auto, int8, int4, none) keeps linear weights compact."""
        from qwenkit.quant.apply import check_mode

        check_mode(quant)
        if self.kind == "gguf":
            model = load_gguf(self._gguf, self.config, dtype, quant, mmproj=self.mmproj)
        else:
            model = load_hf(self.path, self.config, self._weights, dtype, quant)
        if model.visual is not None:
            from qwenkit.quant.plan import KernelPlan

            model.visual.to(KernelPlan.detect().vision_dtype(quant))
        return model

    def tokenizer(self):
        """The checkpoint's tokenizer, built once. A GGUF's vocabulary and merges are dropped from its metadata
        once the tokenizer holds them: as Python objects they cost ~40 MB of resident memory for Qwen's 151,665
        tokens, for as long as the model is loaded (qwenkit.tune.export reads them from a checkpoint of its own)."""
        from qwenkit.text.tokenizer import Tokenizer

        if self._tokenizer is None:
            if self.kind == "gguf":
                self._tokenizer = Tokenizer.from_gguf_metadata(self._gguf.metadata, str(self.path))
                for key in _TOKENIZER_ARRAYS:
                    self._gguf.metadata.pop(key, None)
            else:
                self._tokenizer = Tokenizer.from_hf_dir(self.path)
        return self._tokenizer

    @functools.cached_property
    def generation_config(self) -> dict[str, Any]:
        """generation_config.json of a folder ({} when absent or for GGUF files, which carry none).

        Read once: sampling defaults are asked for on every request."""
        if self.kind != "hf":
            return {}
        path = self.path / "generation_config.json"
        return _json_object(path) if path.exists() else {}

    def sampling_defaults(self, thinking: bool = False) -> dict[str, Any]:
        gen = self.generation_config
        if gen.get("do_sample") is False:
            return {"temperature": 0.0}
        defaults = dict(QWEN3_THINKING_DEFAULTS if thinking else QWEN_DEFAULTS)
        for key in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
            if isinstance(gen.get(key), (int, float)):
                defaults[key] = gen[key]
        return defaults

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = list(self.config.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids += [i for i in QWEN_STOP_IDS if i < self.config.vocab_size and tokenizer.id_to_token(i) is not None]
        return sorted(set(ids))

    def image_spec(self):
        """How this vision-language model's images are cut into patches (qwenkit.media.image.ImageSpec): the
        folder's preprocessor_config.json, or a GGUF's mmproj metadata, else what its family's releases ship."""
        from qwenkit.media.image import QWEN3_VL, QWEN25_VL, ImageSpec

        vision = self.config.vision
        if vision is None:
            return None
        path = self.path / "preprocessor_config.json" if self.kind == "hf" else None
        if self.mmproj is not None:
            spec = self.mmproj.spec
        elif path is not None and path.exists():
            spec = ImageSpec.from_preprocessor_config(_json_object(path))
        else:
            spec = QWEN3_VL if vision.family == "qwen3_vl" else QWEN25_VL
        if (spec.patch_size, spec.temporal_patch_size, spec.merge_size) != (
                vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size):
            raise BadCheckpoint(f"{self.path}: the image processor's patch sizes do not match the vision tower's")
        return spec

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each type (GGML type names, or safetensors dtypes)."""
        counts: dict[str, int] = {}
        for type_name, _ in self.tensors().values():
            counts[type_name] = counts.get(type_name, 0) + 1
        return counts

    def tensors(self) -> dict[str, tuple[str, int]]:
        """Every tensor's type (GGML type name, or safetensors dtype) and number of dimensions, by name."""
        if self.kind == "gguf":
            files = [self._gguf] + ([self.mmproj.file] if self.mmproj is not None else [])
            return {name: (t.qtype.name, len(t.shape)) for f in files for name, t in f.tensors.items()}
        return {name: (self._weights.dtype(name), len(self._weights.shape(name))) for name in self._weights.names()}

    def parameter_count(self) -> int:
        if self.kind == "gguf":
            tower = self.mmproj.parameter_count() if self.mmproj is not None else 0
            return sum(t.n_elements for t in self._gguf.tensors.values()) + tower
        total = 0
        for name in self._weights.names():
            n = 1
            for d in self._weights.shape(name):
                n *= d
            total += n
        return total


def _mmproj_beside(path: Path) -> Path | None:
    """The one mmproj*.gguf file in the model file's folder; None where there is none, or more than one."""
    found = [p for p in path.parent.glob("mmproj*.gguf") if p.is_file()]
    return found[0] if len(found) == 1 else None


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file of the checkpoint folder; {} where it holds something other than an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadCheckpoint(f"{path}: not valid JSON ({e})") from None
    return raw if isinstance(raw, dict) else {}


def open_checkpoint(path: Path, mmproj: Path | None | Literal[False] = None) -> Checkpoint:
    """Open a GGUF file or a Hugging Face folder (headers and JSON only).

    mmproj: for llama.cpp's GGUF of a vision-language model (architecture qwen2vl or qwen3vl), the vision tower's
    file (llama.cpp's --mmproj); the checkpoint then takes images, its decoder loading from `path` and its tower
    from the mmproj. None (the default) picks up an mmproj*.gguf file beside the model file, but only if exactly one
    is there: with none, or several to choose from, the model loads text-only, as llama.cpp does without --mmproj.
    False: text-only even if one is there."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "gguf":
        from qwenkit.checkpoint.gguf_split import open_gguf

        gguf = open_gguf(path)
        arch = gguf.metadata.get("general.architecture")
        if arch == "clip":
            raise BadCheckpoint(f"{path}: this is a vision projector (mmproj) file; open the language model's GGUF "
                                f"with mmproj={path.name}")
        config = ModelConfig.from_gguf_metadata(gguf.metadata, source=str(path))
        config.tie_word_embeddings = "output.weight" not in gguf.tensors
        if config.is_moe:
            # GGUF metadata has no mlp_only_layers: a layer without a router is a dense one.
            config.mlp_only_layers = [
                i for i in range(config.num_hidden_layers) if f"blk.{i}.ffn_gate_inp.weight" not in gguf.tensors
            ]
        if mmproj is None and arch in GGUF_VL_ARCHITECTURES:
            mmproj = _mmproj_beside(path)
        tower = None
        if mmproj:
            from qwenkit.checkpoint.mmproj import attach_tower, open_mmproj

            tower = open_mmproj(Path(mmproj))
            try:
                attach_tower(config, gguf.metadata, tower, str(path))
            except BaseException:
                tower.close()
                raise
        return Checkpoint(path, kind, config, _gguf=gguf, mmproj=tower)
    if mmproj:
        raise BadCheckpoint(f"{path}: an mmproj file goes with a GGUF model, not a Hugging Face folder")
    from qwenkit.checkpoint.safetensors import SafetensorsFolder

    config = ModelConfig.from_json_file(path / "config.json")
    return Checkpoint(path, kind, config, _weights=SafetensorsFolder(path))
