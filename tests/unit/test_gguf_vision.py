"""llama.cpp's pair of GGUF files for Qwen VL models (language model + mmproj), written by qwenkit and read back.

Each tiny family (tests.tiny_vision) is written as llama.cpp lays it out: the decoder with write_gguf (architecture
qwen2vl / qwen3vl), the tower with write_mmproj. open_checkpoint(lm, mmproj=...) must then give the Hugging Face
folder's model: the same config, and on two real photos of different shapes the same vision features and logits.

Tolerances: F32 files hold the folder's weights bit for bit and both sides run the same code, so features and logits
agree within 1e-5 (0 in practice). An F16 mmproj rounds the tower's matrices to half precision (relative error
~5e-4 per weight), which moves these tiny random towers' features and logits by ~4e-3: bound 2e-2, still five times
under what a wrong name, slice or window order does (1e-1 and up).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qwenkit.checkpoint import open_checkpoint
from qwenkit.checkpoint.gguf_write import tokenizer_metadata_from_hf, write_gguf
from qwenkit.checkpoint.mmproj import write_mmproj
from qwenkit.engine.multimodal import MultimodalPrompt
from qwenkit.errors import BadCheckpoint, UnsupportedModel
from qwenkit.model.qwen import ImageRows
from qwenkit.runtime import Model
from tests.tiny_vision import tiny_vl_folder, tiny_vl_model, two_photo_chat

gguf = pytest.importorskip("gguf")

F32_BOUND, F16_BOUND = 1e-5, 2e-2


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def files(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = tiny_vl_folder(root / "hf", family)
    model = tiny_vl_model(family)  # the folder's weights (same seed)
    spec = open_checkpoint(folder).image_spec()
    (root / "pair").mkdir()
    lm = write_gguf(model, root / "pair" / "model-f32.gguf",
                    tokenizer_meta=tokenizer_metadata_from_hf(folder, model.config.vocab_size))
    mm32 = write_mmproj(model, root / "pair" / "mmproj-model-f32.gguf", spec, "f32")
    mm16 = write_mmproj(model, root / "mmproj-model-f16.gguf", spec, "f16")
    reference = Model(open_checkpoint(folder), quant="none")
    return SimpleNamespace(family=family, root=root, folder=folder, lm=lm, mm32=mm32, mm16=mm16,
                           reference=reference, expected=run(reference))


def run(model: Model) -> SimpleNamespace:
    """Token ids, pixels, vision features and logits of the two-photo chat."""
    prepared = model.prepare_chat(two_photo_chat())
    ids = torch.tensor([prepared.prompt_ids])
    mm = MultimodalPrompt(prepared.prompt_ids, prepared.images, model.config)
    with torch.no_grad():
        features = mm.encode(model.model.visual)
        logits = model.model(ids, images=ImageRows(mm.rows, features),
                             rope_positions=mm.rope(0, ids.shape[1])[:, None])
    return SimpleNamespace(ids=prepared.prompt_ids, pixels=torch.cat([im.pixel_values for im in prepared.images]),
                           features=features, logits=logits)


def max_diff(got: SimpleNamespace, want: SimpleNamespace) -> float:
    assert got.ids == want.ids and torch.equal(got.pixels, want.pixels)
    pairs = [(got.features.embeds, want.features.embeds), (got.logits, want.logits),
             *zip(got.features.deepstack, want.features.deepstack, strict=True)]
    return max((a - b).abs().max().item() for a, b in pairs)


def test_config_and_image_spec_match_the_folder(files):
    folder, pair = open_checkpoint(files.folder), open_checkpoint(files.lm, mmproj=files.mm32)
    want, got = folder.config, pair.config
    assert got.vision == want.vision and got.vision.family == files.family
    assert (got.mrope_section, got.mrope_interleaved) == (want.mrope_section, want.mrope_interleaved)
    assert (got.image_token_id, got.vision_start_token_id) == (want.image_token_id, want.vision_start_token_id)
    # GGUF keeps rms_norm_eps in float32, and Qwen3's attention_bias only as the absence of bias tensors.
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert (got.qkv_bias, got.o_bias) == (want.qkv_bias, want.o_bias)
    assert dataclasses.replace(got, rms_norm_eps=want.rms_norm_eps, attention_bias=want.attention_bias) == want
    assert pair.image_spec() == folder.image_spec()


def test_f32_pair_gives_the_folders_features_and_logits(files):
    ours = Model(open_checkpoint(files.lm, mmproj=files.mm32), quant="none")
    assert max_diff(run(ours), files.expected) < F32_BOUND


def test_f16_mmproj_stays_close(files):
    ours = Model(open_checkpoint(files.lm, mmproj=files.mm16), quant="none")
    diff = max_diff(run(ours), files.expected)
    assert 0 < diff < F16_BOUND, f"F16 mmproj differs by {diff:.2e}"


def test_gguf_py_reads_our_files(files):
    vl = files.family == "qwen3_vl"
    lm = gguf.GGUFReader(files.lm)
    arch = "qwen3vl" if vl else "qwen2vl"
    assert lm.fields["general.architecture"].contents() == arch
    assert lm.fields[f"{arch}.rope.dimension_sections"].contents() == [4, 2, 2, 0]
    assert (lm.fields[f"{arch}.n_deepstack_layers"].contents() == 2) if vl else \
        f"{arch}.n_deepstack_layers" not in lm.fields
    assert not any(t.name.startswith(("v.", "mm.", "visual.")) for t in lm.tensors)

    mm = gguf.GGUFReader(files.mm32)
    keys = {name: field.contents() for name, field in mm.fields.items() if not name.startswith("GGUF.")}
    K, V = gguf.Keys.Clip, gguf.Keys.ClipVision
    assert keys["general.architecture"] == "clip" and keys[K.HAS_VISION_ENCODER] is True
    assert keys[K.PROJECTOR_TYPE] == ("qwen3vl_merger" if vl else "qwen2.5vl_merger")
    assert (keys[V.BLOCK_COUNT], keys[V.EMBEDDING_LENGTH], keys[V.FEED_FORWARD_LENGTH]) == (3, 32, 48)
    assert (keys[V.Attention.HEAD_COUNT], keys[V.PROJECTION_DIM], keys[V.SPATIAL_MERGE_SIZE]) == (2, 64, 2)
    assert keys[V.PATCH_SIZE] == (16 if vl else 14) and len(keys[V.IMAGE_MEAN]) == len(keys[V.IMAGE_STD]) == 3
    if vl:
        assert keys[V.IS_DEEPSTACK_LAYERS] == [True, True, False] and keys[V.USE_GELU] is True
    else:
        assert (keys[V.N_WA_PATTERN], keys[V.WINDOW_SIZE], keys[V.USE_SILU]) == (2, 56, True)

    tensors = {t.name: t for t in mm.tensors}
    block = ["ln1", "ln2", "attn_out", "ffn_up", "ffn_down"] + (["attn_qkv"] if vl else
                                                                 ["attn_q", "attn_k", "attn_v", "ffn_gate"])
    expected = {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.0.bias",
                "mm.2.weight", "mm.2.bias"}
    expected |= {f"v.blk.{i}.{part}.weight" for i in range(3) for part in block}
    if vl:
        expected |= {"v.patch_embd.bias", "v.position_embd.weight", "v.post_ln.bias"}
        expected |= {f"v.deepstack.{i}.{part}.weight" for i in (0, 1) for part in ("norm", "fc1", "fc2")}
    assert expected <= set(tensors)
    assert not any(".blk.3." in name or name.startswith("visual.") for name in tensors)
    assert [int(n) for n in tensors["v.patch_embd.weight.1"].shape] == [keys[V.PATCH_SIZE]] * 2 + [3, 32]  # ggml ne
    assert tensors[("v.blk.0.attn_qkv" if vl else "v.blk.0.attn_q") + ".weight"].data.shape == \
        ((96, 32) if vl else (32, 32))
    f16 = {t.name: t.tensor_type for t in gguf.GGUFReader(files.mm16).tensors}
    assert f16["mm.0.weight"] == gguf.GGMLQuantizationType.F16 and f16["mm.0.bias"] == gguf.GGMLQuantizationType.F32


def test_without_an_mmproj_the_model_is_text_only(files, tmp_path):
    alone = shutil.copy(files.lm, tmp_path / "model.gguf")
    for checkpoint in (open_checkpoint(alone), open_checkpoint(files.lm, mmproj=False)):
        assert checkpoint.config.vision is None and checkpoint.config.mrope_section == [4, 2, 2]
        model = checkpoint.load_model()
        assert model.visual is None and "visual.blocks.0.norm1.weight" not in model.state_dict()
    # The one mmproj*.gguf beside the model is picked up; with two to choose from, none is.
    assert open_checkpoint(files.lm).config.vision == open_checkpoint(files.folder).config.vision
    shutil.copy(files.mm32, tmp_path / "mmproj-a.gguf")
    assert open_checkpoint(alone).config.vision is not None
    shutil.copy(files.mm16, tmp_path / "mmproj-b.gguf")
    assert open_checkpoint(alone).config.vision is None


def rewrite(src: Path, dst: Path, drop: str | None = None, transpose: str | None = None,
            kv: dict | None = None) -> Path:
    """A copy of an F32 GGUF file through gguf-py, with a tensor dropped or transposed, or metadata replaced."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        w.add_key_value(name, (kv or {}).get(name, field.contents()), kind,
                        sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name != drop:
            data = np.array(t.data)
            w.add_tensor(t.name, np.ascontiguousarray(data.T) if t.name == transpose else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_mmproj_files_name_the_file_and_tensor(files, tmp_path):
    missing = "v.deepstack.1.fc2.weight" if files.family == "qwen3_vl" else "v.blk.1.attn_k.bias"
    cases = [
        (rewrite(files.mm32, tmp_path / "missing.gguf", drop=missing), BadCheckpoint, f"missing tensor.*{missing}"),
        (rewrite(files.mm32, tmp_path / "shape.gguf", transpose="v.blk.0.ffn_up.weight"), BadCheckpoint,
         r"v\.blk\.0\.ffn_up\.weight has shape \[32, 48\], expected \[48, 32\]"),
        (rewrite(files.mm32, tmp_path / "projector.gguf", kv={"clip.projector_type": "qwen2vl_merger"}),
         UnsupportedModel, "projector type 'qwen2vl_merger'"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            open_checkpoint(files.lm, mmproj=path).load_model()
        assert str(caught.value).startswith(str(path))
    # An mmproj of the other family does not pair with this language model.
    other = "qwen2_5_vl" if files.family == "qwen3_vl" else "qwen3_vl"
    foreign = write_mmproj(tiny_vl_model(other), tmp_path / "foreign.gguf",
                           open_checkpoint(tiny_vl_folder(tmp_path / "other", other)).image_spec())
    with pytest.raises(BadCheckpoint, match="foreign.gguf.*goes with a"):
        open_checkpoint(files.lm, mmproj=foreign)
    with pytest.raises(BadCheckpoint, match="vision projector"):
        open_checkpoint(files.mm32)
