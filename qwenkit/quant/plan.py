"""The kernel plan: which kernel each layer of a model runs on this CPU, decided in one place.

Every input is read here: the CPU's features (qwenkit.kernels.cpu), the C kernels' variant (qwenkit.kernels.library,
QWENKIT_KERNELS), PyTorch's int8 engine (fbgemm, QWENKIT_FBGEMM) and native bf16 (QWENKIT_BF16), the thread count;
and per model, the checkpoint's tensor types and the --quant mode. The loader asks the plan how to keep each tensor
(qwenkit.quant.apply), the quantized layers ask it which kernel runs them (qwenkit.quant.linear), the engine asks
it for the KV dtype, and `qwenkit info MODEL --kernels` and `qwenkit run -v` print it.

Per linear layer there are two kernels: one for generated tokens (decode, each row alone: the engine's batch
invariance) and one for prompt chunks (the weight dequantized once per call, then the regular matrix kernel).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from qwenkit.checkpoint.quants import GGMLType
from qwenkit.kernels import blocks as block_kernels
from qwenkit.kernels import build, library
from qwenkit.kernels.cpu import cpu_flags, has_fbgemm, native_bf16, vnni
from qwenkit.quant import tinygemm
from qwenkit.quant.from_gguf import CONVERTIBLE

GGML_FLOAT = ("F32", "F16", "BF16")
# GGML type names whose 2-D tensors load as exact int4 (4-bit types) or int8 where there is no block kernel.
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")
EMBEDDINGS = ("token_embd.weight", "model.embed_tokens.weight")


def default_kv_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float16 keys and values for a float32 model, as llama.cpp keeps them on the CPU: half the memory and half
    the bytes each decode step reads, for a rounding far below the weights' own quantization. A bf16 or fp16
    model keeps its own dtype."""
    return torch.float16 if model_dtype == torch.float32 else model_dtype


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return build.machine()


@dataclass(frozen=True)
class KernelPlan:
    variant: str | None  # the C kernels this process runs (None: not built here, or QWENKIT_KERNELS=none)
    bf16: bool  # bf16 products are native: prompt chunks and the fused int8/int4 kernels run in bf16
    fbgemm: bool  # PyTorch's x86 int8 engine
    vnni: bool  # fbgemm's 8-bit products cannot saturate (else activations use 7 bits)
    threads: int

    @classmethod
    def detect(cls) -> KernelPlan:
        """The plan for this process, from the CPU and the QWENKIT_* overrides. A variant forced below the CPU's
        own (QWENKIT_KERNELS=avx2 on an AVX-512 machine) stands for a CPU without bf16 instructions too, unless
        QWENKIT_BF16 says otherwise: the whole path of such a machine is then measured."""
        variant = library.selected()
        bf16 = native_bf16()
        forced_below = variant is not None and os.environ.get(library.ENV) and variant != "avx512vnni"
        if forced_below and os.environ.get("QWENKIT_BF16") is None:
            bf16 = False
        return cls(variant=variant, bf16=bf16, fbgemm=has_fbgemm(), vnni=vnni(), threads=torch.get_num_threads())

    # ---- decisions -----------------------------------------------------------------------------------------------
    def block_kernel(self, qtype: int) -> bool:
        """Whether a GGUF tensor of this ggml type stays in its blocks and runs on the C block kernels."""
        return self.variant is not None and block_kernels.supports(qtype)

    def prompt_on_blocks(self, qtypes: list[int]) -> bool:
        """Whether prompt chunks of a block layer run on the block kernels too (int8 activations, each row alone)
        instead of the dequantized weight and the matrix kernel. So where bf16 is not native and every part is
        a type the kernels interleave by 8 (Q4_0, Q5_0, Q8_0): there their int8 products run 1.4 to 2.7 times
        faster than dequantizing for PyTorch's fp32 matrix kernel (AVX2, 512 rows), while the K-quants' row
        kernels are slower, and bf16 products faster still. The cost: 8-bit activations in the prompt too, as
        llama.cpp computes them."""
        return self.variant is not None and not self.bf16 and all(
            int(t) & ~block_kernels.X8 in block_kernels.INTERLEAVED for t in qtypes)

    @property
    def per_row_int8(self) -> bool:
        """int8 weights keep one scale per row, the layout fbgemm takes (else exact GGUF groups)."""
        return self.fbgemm

    def int8_kernel(self, per_row: bool) -> str:
        """The decode kernel of an int8 weight: "fbgemm" (x86, one scale per row) or "compiled" (our
        torch.compile'd fp32 kernel, any layout). PyTorch's bf16 `_weight_int8pack_mm` is not used: every x86
        build has fbgemm, which was faster wherever both ran, and no Arm CPU is detected as native bf16."""
        return "fbgemm" if per_row and self.fbgemm else "compiled"

    def int4_kernel(self, rows: int, cols: int, group: int) -> str:
        """The decode kernel of an int4 weight: "tinygemm" (PyTorch's bf16 kernel, rows in 64s) or "compiled"."""
        return "tinygemm" if self.bf16 and tinygemm.supported(rows, cols, group) else "compiled"

    @property
    def matrix_dtype(self) -> torch.dtype:
        """The dtype prompt chunks multiply in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def vision_dtype(self, quant: str) -> torch.dtype:
        """The dtype a vision tower runs in: every one of its products has thousands of rows (an image's patches),
        so it runs in the prompt chunks' dtype (bf16 where native: 3x fp32's speed on AVX512-BF16), except under
        quant none, the fp32 reference path."""
        return torch.float32 if quant == "none" else self.matrix_dtype

    # ---- description -------------------------------------------------------------------------------------------
    def _c(self) -> str:
        return f"C {self.variant}"

    def _matrix(self) -> str:
        return "bf16" if self.matrix_dtype == torch.bfloat16 else "fp32"

    def linear(self, type_name: str, quant: str) -> tuple[str, str]:
        """(decode kernel, prompt kernel) of a 2-D weight of this type (GGML type name or torch dtype name)."""
        prompt = f"dequantize + matmul {self._matrix()}"
        qtype = _ggml_id(type_name)
        if quant == "auto" and qtype is not None and self.block_kernel(qtype):
            decode = f"{type_name} blocks x int8 ({self._c()})"
            return decode, decode if self.prompt_on_blocks([qtype]) else prompt
        float_type = type_name.upper() in GGML_FLOAT or type_name.startswith(("float", "bfloat"))
        # auto keeps a type with no exact int8/int4 form (IQ*, Q8_1...) in float, as apply.gguf_format does
        if quant == "none" or (quant == "auto" and (float_type or qtype is None or qtype not in CONVERTIBLE)):
            return "matmul fp32 (torch)", "matmul fp32 (torch)"
        four = quant == "int4" or (quant == "auto" and type_name in FOUR_BIT)
        if four:
            return f"int4 groups of 32, {self.int4_kernel(64, 64, 32)}", prompt
        if quant == "auto":  # the file's own groups, exact (see apply.gguf_format)
            return f"int8 groups, {self.int8_kernel(False)}", prompt
        return f"int8, {self.int8_kernel(self.per_row_int8)}", prompt

    def describe(self, tensors: dict[str, tuple[str, int]] | None = None, quant: str = "auto",
                 model_dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None) -> str:
        """The plan as text: the CPU and the choices every layer shares, then one line per kind of tensor
        (layers folded: blk.*.attn_q.weight) with its type and its decode and prompt kernels. tensors: name ->
        (type name, number of dimensions)."""
        flags = cpu_flags()
        isa = [f for f in ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                           "asimddp", "i8mm", "bf16") if f in flags]
        runnable = [v for v in build.variants() if library.runnable(v)]
        lines = [
            f"cpu: {_cpu_name()} ({build.machine()}: {' '.join(isa) or 'baseline'})",
            (f"kernel variant: {self.variant or 'none (PyTorch paths)'}"
             f" (this CPU runs: {', '.join(runnable)}; {library.ENV}={os.environ.get(library.ENV) or 'unset'})"),
            f"threads: {self.threads}",
            f"kv cache: {str(kv_dtype or default_kv_dtype(model_dtype)).removeprefix('torch.')}",
            f"attention: {'paged, ' + self._c() if self.variant else 'PyTorch (gathered keys, SDPA)'}",
            f"rms norm: {self._c() if self.variant else 'PyTorch'}",
            "decode layers: " + ("dense layers on GGUF blocks fused, input norm to gate/up in one call "
                                 f"({self._c()})" if self.variant else "module by module"),
            f"prompt chunks: {self._matrix()} matrix products{' (native bf16)' if self.bf16 else ''}",
        ]
        if tensors and any(name.startswith(("visual.", "model.visual.", "v.")) for name in tensors):
            vision = str(self.vision_dtype(quant)).removeprefix("torch.")
            lines.append(f"vision tower: {vision} (weights, products and attention), all of a request's images at once")
        if tensors:
            groups: dict[tuple[str, str, int], int] = {}
            for name, (type_name, ndim) in tensors.items():
                key = (re.sub(r"\.\d+\.", ".*.", name), type_name, ndim)
                groups[key] = groups.get(key, 0) + 1
            width = max(len(k[0]) for k in groups)
            lines.append("tensors (count, type: decode kernel | prompt kernel):")
            for (name, type_name, ndim), count in sorted(groups.items()):
                if ndim != 2:
                    lines.append(f"  {name:{width}} {count:>3} x {type_name}: vector (norm weight or bias)")
                    continue
                decode, prompt = self.linear(type_name, quant)
                if name in EMBEDDINGS:  # looked up by rows; the head's products, where tied, are the lines above
                    decode = prompt = f"{type_name} rows dequantized per lookup"
                lines.append(f"  {name:{width}} {count:>3} x {type_name}: {decode} | {prompt}")
        return "\n".join(lines)


def _ggml_id(type_name: str) -> int | None:
    try:
        return int(GGMLType[type_name])
    except KeyError:
        return None
