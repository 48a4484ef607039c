"""Build a QwenForCausalLM from a checkpoint: a Hugging Face folder (safetensors) or a GGUF file.

The model is built on the meta device, given uninitialised storage, and every parameter is then filled straight
from the memory-mapped checkpoint, one tensor at a time. Peak memory is the model plus one tensor, never two models.
Every parameter must be filled exactly once with the right shape; anything else is a BadCheckpoint naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from qwenkit.checkpoint.names import Target, gguf_target, hf_target
from qwenkit.checkpoint.safetensors import SafetensorsFolder
from qwenkit.errors import BadCheckpoint
from qwenkit.model.config import ModelConfig
from qwenkit.model.qwen import QwenForCausalLM


GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def checkpoint_kind(path: Path) -> str:
    """'gguf' or 'hf' for a usable checkpoint path; BadCheckpoint for anything else."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BadCheckpoint(f"{path}: folder has no config.json (not a Hugging Face checkpoint)")
        return "hf"
    if path.is_file():
        if is_gguf(path):
            return "gguf"
        raise BadCheckpoint(f"{path}: not a GGUF file (bad magic) and not a checkpoint folder")
    raise BadCheckpoint(f"{path}: no such file or folder")


@contextmanager
def _skip_init():
    """Skip nn.init while building: every parameter is overwritten from the checkpoint, and on the meta device
    the init calls would only cost time (they import torch._dynamo, about a second)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_", "constant_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def empty_model(config: ModelConfig, dtype: torch.dtype) -> QwenForCausalLM:
    with _skip_init(), torch.device("meta"):
        model = QwenForCausalLM(config)
    return model.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)


def fill(
    model: QwenForCausalLM,
    names: list[str],
    target_of: Callable[[str], Target | None],
    shape_of: Callable[[str], tuple[int, ...]],
    copy_into: Callable[[str, torch.Tensor], None],
    source: str,
    scope: Callable[[str], bool] | None = None,
    what: str | None = None,
) -> None:
    """Fill every parameter of `model` from the checkpoint tensors `names` (see module docstring).

    scope: which parameters this checkpoint holds (default: all). A llama.cpp VL model comes in two files, the
    decoder's and the vision tower's (qwenkit.checkpoint.mmproj), each filling its own part. what: the model part,
    for messages ("a qwen2 model")."""
    params = {n: p for n, p in model.named_parameters() if scope is None or scope(n)}
    what = what or f"a {model.config.model_type} model"
    tied = model.lm_head is None
    covered: dict[str, int] = {}
    for name in names:
        target = target_of(name)
        if target is None:
            raise BadCheckpoint(f"{source}: unexpected tensor {name} for {what}")
        if target.param == "lm_head.weight" and tied:
            continue  # some tied checkpoints also store the head; the embedding is the head
        if target.param not in params:
            raise BadCheckpoint(f"{source}: unexpected tensor {name} for {what}")
        view = params[target.param].data[target.index] if target.index else params[target.param].data
        shape = tuple(shape_of(name))
        if shape != tuple(view.shape):
            # GGUF stores 1-row tensors (the shared-expert gate) without the unit dimension.
            if not (target.param.endswith("shared_expert_gate.weight") and shape == tuple(view.shape[1:])):
                raise BadCheckpoint(
                    f"{source}: tensor {name} has shape {list(shape)}, expected {list(view.shape)} for {target.param}"
                )
        copy_into(name, view)
        covered[target.param] = covered.get(target.param, 0) + view.numel()
    missing = [p for p, t in params.items() if covered.get(p, 0) != t.numel()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise BadCheckpoint(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")


def load_hf(
    folder: Path, config: ModelConfig, weights: SafetensorsFolder, dtype: torch.dtype, quant: str = "none"
) -> QwenForCausalLM:
    from qwenkit.quant import apply

    model = empty_model(config, dtype)
    target_of = lambda n: hf_target(n, config)  # noqa: E731
    names = [n for n in weights.names() if not n.endswith("rotary_emb.inv_freq")]
    if quant != "none":
        names = apply.install(model, names, target_of, lambda n: apply.float_format(weights.get(n), quant), str(folder))

    def copy_into(name: str, view: torch.Tensor) -> None:
        view.copy_(weights.get(name).reshape(view.shape))

    fill(model, names, target_of, weights.shape, copy_into, str(folder))
    if quant != "none":
        apply.fuse(model)
    return model


def load_gguf(gguf, config: ModelConfig, dtype: torch.dtype, quant: str = "none", mmproj=None) -> QwenForCausalLM:
    """mmproj: for a VL config, the open vision projector file (qwenkit.checkpoint.mmproj.Mmproj) that holds the
    tower; the language model GGUF holds only the decoder, as llama.cpp splits them."""
    from qwenkit.quant import apply
    from qwenkit.quant.plan import KernelPlan

    if config.vision is not None and mmproj is None:
        raise BadCheckpoint(f"{gguf.path}: a vision-language config needs the vision tower's mmproj file")
    model = empty_model(config, dtype)
    target_of = lambda n: gguf_target(n, config)  # noqa: E731
    names = list(gguf.tensors)
    if quant != "none":
        plan = KernelPlan.detect()

        def make_format(name: str):
            fmt = apply.gguf_format(gguf, name, quant, plan)
            gguf.release(name)
            return fmt

        names = apply.install(model, names, target_of, make_format, str(gguf.path))

    shapes = lambda n: gguf.tensors[n].shape  # noqa: E731
    fill(model, names, target_of, shapes, gguf_copier(gguf), str(gguf.path),
         scope=lambda p: not p.startswith("visual."))
    if mmproj is not None:
        mmproj.fill(model)
    if quant != "none":
        apply.fuse(model)
    return model


def gguf_copier(gguf) -> Callable[[str, torch.Tensor], None]:
    """fill's copy_into for a GGUF file: decode each tensor into its parameter (or slice of one), then drop its
    mapped pages so the load's peak stays the model plus one tensor."""

    def copy_into(name: str, view: torch.Tensor) -> None:
        if view.is_contiguous() and view.dtype == torch.float32 and tuple(view.shape) == gguf.tensors[name].shape:
            gguf.dequantize(name, out=view)  # straight from the memory map into the parameter
        else:
            view.copy_(gguf.dequantize(name).reshape(view.shape))
        gguf.release(name)

    return copy_into


def load_weights(path: Path, dtype: torch.dtype = torch.float32) -> tuple[QwenForCausalLM, ModelConfig]:
    """Load a model from a GGUF file or a Hugging Face folder, with weights in `dtype`."""
    from qwenkit.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path)
    return checkpoint.load_model(dtype), checkpoint.config
