"""`qwenkit export MODEL --gguf OUT [--type f32|f16|q8_0] [--adapter DIR]`: a model (with a tuned adapter folded in)
as one GGUF file that llama.cpp, ollama and qwenkit load, tokenizer and chat template included. A vision-language
model is written as llama.cpp keeps one: OUT holds the language model, and mmproj-OUT beside it the vision tower
(F32 for --type f32, else F16, as llama.cpp's converter writes mmproj files)."""

from __future__ import annotations

from pathlib import Path

from qwenkit.errors import BadRequest

TYPES = ("f32", "f16", "q8_0")


def export_gguf(model_path: Path, out: Path, qtype: str = "f16", adapter: Path | None = None,
                progress: bool = False) -> list[Path]:
    """Write the GGUF file(s); -> their paths: OUT, then mmproj-OUT for a vision-language model."""
    import gguf

    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.checkpoint.gguf_write import tokenizer_metadata_from_gguf, tokenizer_metadata_from_hf, write_gguf
    from qwenkit.tune.merge import merge_adapter

    if qtype not in TYPES:
        raise BadRequest(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    checkpoint = open_checkpoint(model_path)
    model = checkpoint.load_model()
    if adapter is not None:
        merge_adapter(model, adapter)
    if checkpoint.kind == "gguf":
        meta = tokenizer_metadata_from_gguf(checkpoint._gguf)
    else:
        meta = tokenizer_metadata_from_hf(Path(model_path), model.config.vocab_size)
    kind = None if qtype == "f32" else gguf.GGMLQuantizationType[qtype.upper()]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    written = []
    write_gguf(model, partial, qtype=kind, tokenizer_meta=meta, progress=progress)
    if model.visual is not None:
        from qwenkit.checkpoint.mmproj import write_mmproj

        tower = out.with_name(f"mmproj-{out.name}")
        write_mmproj(model, tower.with_name(tower.name + ".partial"), checkpoint.image_spec(),
                     "f32" if qtype == "f32" else "f16").replace(tower)
        written.append(tower)
    partial.replace(out)
    return [out, *written]
