"""The `qwenkit` console script, run as a real subprocess.

Bad input must give exactly one `qwenkit: error: ...` line on stderr naming the file or model at fault, a non-zero
exit code and never a traceback. Happy paths run tiny complete checkpoints (tests/tiny_checkpoint.py) and compare
the command's output with the Python API. Every command gets its own QWENKIT_HOME and HF_HOME under tmp, and a hub
endpoint on a closed local port (or the fake hub of tests/unit/test_hub.py), so nothing touches the real cache or
the network. One test (real_weights, slow) runs the real default model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny_checkpoint import other_vocabulary, tiny_gguf, tiny_hf_folder, tiny_model
from tests.unit.test_hub import FakeHub, closed_port_url

TIMEOUT = 120  # seconds per tiny-checkpoint command (each is ~3-6 s: mostly importing torch)
PROMPT = "hello"
GREEDY = ["--temperature", "0", "--max-tokens", "8"]
GREEDY_KW = dict(temperature=0.0, max_tokens=8)


def qwenkit_command() -> list[str]:
    """The installed console script of the running interpreter's environment (else `python -m qwenkit`)."""
    script = Path(sys.executable).with_name("qwenkit")
    if script.exists():
        return [str(script)]
    found = shutil.which("qwenkit")
    return [found] if found else [sys.executable, "-m", "qwenkit"]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run_cli(*args: str, env: dict, stdin: str | None = None, timeout: float = TIMEOUT) -> Result:
    p = subprocess.run(
        [*qwenkit_command(), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        env=env,
        timeout=timeout,
        text=True,
        encoding="utf-8",
    )
    return Result(p.returncode, p.stdout, p.stderr)


def assert_one_error_line(r: Result, *needles: str) -> str:
    """Non-zero exit, nothing on stdout, no traceback, one `qwenkit: error:` line on stderr containing `needles`."""
    assert r.rc not in (0, None), str(r)
    assert "Traceback" not in r.out + r.err, str(r)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, str(r)
    assert lines[0].startswith("qwenkit: error: "), str(r)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the message\n{r}"
    assert r.out == "", str(r)
    return lines[0]


def shown(text: str) -> str:
    """What the CLI prints for an answer: the text, then a newline unless it already ends with one."""
    return text + "\n" if text and not text.endswith("\n") else text


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "qwenkit-home"


@pytest.fixture
def env(tmp_path, home) -> dict:
    """Environment of every command: a private cache, offline, and a hub endpoint nobody listens on."""
    e = {k: v for k, v in os.environ.items() if k not in ("QWENKIT_PIP_INDEX_URL", "HF_TOKEN", "QWENKIT_TEST_GGUF")}
    e.update(
        QWENKIT_HOME=str(home),
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT=closed_port_url(),
        PYTHONIOENCODING="utf-8",
        PYTHONUNBUFFERED="1",
    )
    return e


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def tiny_q8(tiny_dir) -> Path:
    """The tiny qwen2 model as a GGUF file, 2-D weights Q8_0 (the rest F32)."""
    import gguf

    return tiny_gguf(tiny_dir / "tiny-q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def tiny_folder(tiny_dir) -> Path:
    """The same tiny qwen2 model as a Hugging Face folder (safetensors F32)."""
    return tiny_hf_folder(tiny_dir / "hf")


@pytest.fixture(scope="module")
def tiny(tiny_q8, tiny_folder) -> dict[str, Path]:
    return {"gguf": tiny_q8, "hf": tiny_folder}


@pytest.fixture(scope="module")
def api_models(tiny) -> Callable:
    """`api_models(kind)`: the same checkpoint loaded in this process through the Python API (once per module)."""
    import qwenkit

    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = qwenkit.load(tiny[kind], pull=False)
        return cache[kind]

    return get


def gguf_layout(path: Path):
    from qwenkit.checkpoint.gguf import GGUFFile

    with GGUFFile(path) as g:
        return g.data_offset, {name: t.shape for name, t in g.tensors.items()}


def set_gguf_dims(data: bytearray, name: str, shape: tuple[int, ...]) -> None:
    """Rewrite tensor `name`'s dimensions in a GGUF header in place (PyTorch order; ggml stores them reversed)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    assert n_dims == len(shape)
    struct.pack_into(f"<{n_dims}Q", data, at + 4, *reversed(shape))


def copy_folder(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_safetensors(folder: Path, change) -> None:
    """Load model.safetensors, let `change(tensors)` edit the dict, write it back."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------- bad input


def test_missing_file(env):
    r = run_cli("run", "/nonexistent/model.gguf", "hi", env=env)
    assert_one_error_line(r, "/nonexistent/model.gguf")


@pytest.mark.parametrize("where", ["tensor-data", "header"])
def test_truncated_gguf(env, tmp_path, tiny_q8, where):
    data = tiny_q8.read_bytes()
    data_offset, _ = gguf_layout(tiny_q8)
    cut = (data_offset + len(data)) // 2 if where == "tensor-data" else data_offset // 2
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(data[:cut])
    message = assert_one_error_line(run_cli("run", str(bad), "hi", env=env), f"{bad}: ")
    assert re.search(r"truncated|corrupt", message.split(f"{bad}: ", 1)[1]), message


@pytest.mark.parametrize("what", ["bad-magic", "magic-then-garbage", "magic-version-then-garbage"])
def test_corrupt_gguf_header(env, tmp_path, tiny_q8, what):
    import hashlib

    garbage = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(128))  # 4 KiB, deterministic
    data = {
        "bad-magic": b"GGUX" + tiny_q8.read_bytes()[4:],
        "magic-then-garbage": b"GGUF" + garbage,
        "magic-version-then-garbage": b"GGUF" + struct.pack("<I", 3) + garbage,
    }[what]
    bad = tmp_path / f"{what}.gguf"
    bad.write_bytes(data)
    message = assert_one_error_line(run_cli("run", str(bad), "hi", env=env), str(bad))
    want = {"bad-magic": "magic", "magic-then-garbage": "version", "magic-version-then-garbage": "corrupt"}[what]
    assert want in message, message


def test_unknown_architecture_gguf(env, tmp_path, tiny_q8):
    data = bytearray(tiny_q8.read_bytes())
    data_offset, _ = gguf_layout(tiny_q8)
    # Same length, so the file stays well-formed: general.architecture "llama" and llama.* hyperparameter keys.
    data[:data_offset] = bytes(data[:data_offset]).replace(b"qwen2", b"llama")
    bad = tmp_path / "llama.gguf"
    bad.write_bytes(bytes(data))
    assert_one_error_line(run_cli("run", str(bad), "hi", env=env), str(bad), "architecture 'llama'")


def test_unknown_architecture_folder(env, tmp_path, tiny_folder):
    folder = copy_folder(tiny_folder, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_error_line(run_cli("run", str(folder), "hi", env=env), str(folder), "model_type 'llama'")


def test_shape_mismatch_gguf(env, tmp_path, tiny_q8):
    name = "blk.0.ffn_down.weight"
    _, shapes = gguf_layout(tiny_q8)
    rows, cols = shapes[name]
    assert rows != cols
    data = bytearray(tiny_q8.read_bytes())
    set_gguf_dims(data, name, (cols, rows))  # same byte count, transposed shape
    bad = tmp_path / "transposed.gguf"
    bad.write_bytes(bytes(data))
    r = run_cli("run", str(bad), "hi", env=env)
    assert_one_error_line(r, str(bad), name, f"[{cols}, {rows}]", f"expected [{rows}, {cols}]")


def test_shape_mismatch_folder(env, tmp_path, tiny_folder):
    name = "model.layers.0.mlp.down_proj.weight"
    folder = copy_folder(tiny_folder, tmp_path / "transposed")
    shape = []

    def transpose(tensors):
        shape.extend(tensors[name].shape)
        tensors[name] = tensors[name].t()

    rewrite_safetensors(folder, transpose)
    rows, cols = shape
    r = run_cli("run", str(folder), "hi", env=env)
    assert_one_error_line(r, str(folder), name, f"[{cols}, {rows}]", f"expected [{rows}, {cols}]")


def test_missing_tensor_folder(env, tmp_path, tiny_folder):
    folder = copy_folder(tiny_folder, tmp_path / "no-norm")
    rewrite_safetensors(folder, lambda tensors: tensors.pop("model.norm.weight"))
    r = run_cli("run", str(folder), "hi", env=env)
    assert_one_error_line(r, str(folder), "missing tensor", "model.norm.weight")


def test_pull_wrong_sha256_caches_nothing(env, home, tiny_q8):
    fake = FakeHub()
    try:
        fake.add("test-org/Tiny-GGUF", {"tiny-q8_0.gguf": tiny_q8.read_bytes()})
        fake.corrupt.add(("test-org/Tiny-GGUF", "tiny-q8_0.gguf"))  # one byte flipped on the CDN
        env = dict(env, HF_ENDPOINT=fake.endpoint)
        del env["HF_HUB_OFFLINE"]
        r = run_cli("pull", "test-org/Tiny-GGUF:tiny-q8_0.gguf", env=env)
        assert any(line.startswith("cdn GET") for line in fake.requests)  # it did download the file
    finally:
        fake.close()
    assert_one_error_line(r, "tiny-q8_0.gguf", "sha256 mismatch")
    assert tree(home / "models") == []  # neither the bad file nor a staging folder is left


def test_unknown_model_name(env):
    assert_one_error_line(run_cli("run", "qwen9:1b", "hi", env=env), "qwen9:1b", "unknown model")


def test_known_model_not_downloaded_hub_unreachable(env, home):
    env = dict(env)
    del env["HF_HUB_OFFLINE"]  # really try the hub: a closed port
    r = run_cli("run", "qwen3:0.6b", "hi", env=env)
    assert_one_error_line(r, "qwen3:0.6b", "no offline mirror")
    assert tree(home / "models") == []


def test_rm_not_cached(env):
    assert_one_error_line(run_cli("rm", "qwen2.5-coder:0.5b", env=env), "qwen2.5-coder:0.5b", "not downloaded")


def test_info_folder_without_config_json(env, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert_one_error_line(run_cli("info", str(folder), env=env), str(folder), "config.json")


# --------------------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_run_greedy_prints_the_api_answer(env, tiny, api_models, kind):
    r = run_cli("run", str(tiny[kind]), PROMPT, *GREEDY, env=env)
    assert r.rc == 0, str(r)
    expected = api_models(kind).chat([{"role": "user", "content": PROMPT}], **GREEDY_KW)
    assert expected.text  # the tiny model says something in 8 tokens
    assert r.out == shown(expected.text), str(r)  # only the answer on stdout
    # stderr: the reasoning, if the model opened a <think> block, then one statistics line
    stats = (r"\[prompt \d+ tokens at [\d.]+ tok/s, answer 8 tokens at [\d.]+ tok/s, finish length, "
             r"peak memory [\d.]+ GB\]\n")
    reasoning = expected.reasoning + ("\n" if expected.reasoning and not expected.reasoning.endswith("\n") else "")
    assert re.fullmatch(re.escape(reasoning) + stats, r.err), str(r)


def test_run_seed_gives_the_same_answer(env, tiny, api_models):
    sampled = ["--temperature", "1.0", "--seed", "1234", "--max-tokens", "12"]
    args = ["run", str(tiny["gguf"]), PROMPT, *sampled]
    with ThreadPoolExecutor(2) as pool:  # two independent processes: run them side by side
        first, second = pool.map(lambda extra: run_cli(*args, *extra, env=env), [[], ["--quiet-stats"]])
    assert first.rc == 0 and second.rc == 0, f"{first}\n{second}"
    assert first.out == second.out and first.out.strip()
    assert second.err == ""  # --quiet-stats: nothing on stderr at all
    expected = api_models("gguf").chat([{"role": "user", "content": PROMPT}], temperature=1.0, seed=1234,
                                       max_tokens=12)
    assert first.out == shown(expected.text)


def test_run_with_speculation_prints_the_same_answer(env, tiny):
    """--lookup and --draft (here the model's own weights) change the speed, never the greedy text; the statistics
    line says how many guesses were kept."""
    prompt = "one two three, one two three, one two three"
    args = ["run", str(tiny["hf"]), prompt, "--temperature", "0", "--max-tokens", "24"]
    plain = run_cli(*args, "--quiet-stats", env=env)
    assert plain.rc == 0 and plain.out.strip(), str(plain)
    for extra in (["--lookup", "4"], ["--draft", str(tiny["hf"]), "--draft-tokens", "3"]):
        r = run_cli(*args, *extra, env=env)
        assert r.rc == 0, str(r)
        assert r.out == plain.out, str(r)
        assert re.search(r"guesses kept \d+/\d+ \(\d+%\), [\d.]+ tokens per pass", r.err), str(r)


def test_run_with_a_draft_of_another_vocabulary(env, tiny, tmp_path):
    other = other_vocabulary(tiny["hf"], tmp_path / "other-vocab")
    r = run_cli("run", str(tiny["hf"]), PROMPT, "--draft", str(other), *GREEDY, env=env)
    assert_one_error_line(r, f"draft model {other}", "vocabulary differs")


PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    from tests.tiny_vision import tiny_vl_folder

    return tiny_vl_folder(tmp_path_factory.mktemp("tiny-vl"), "qwen2_5_vl")


def test_run_with_images_prints_the_api_answer(env, tiny_vl):
    import qwenkit

    photos = [str(PHOTOS / "chelsea_exif6.jpg"), str(PHOTOS / "coffee_wide.webp")]
    r = run_cli("run", str(tiny_vl), "What are these?", "--image", photos[0], "--image", photos[1], *GREEDY,
                "--quiet-stats", env=env)
    assert r.rc == 0, str(r)
    content = [{"type": "image_url", "image_url": {"url": p}} for p in photos]
    expected = qwenkit.load(str(tiny_vl)).chat(
        [{"role": "user", "content": [*content, {"type": "text", "text": "What are these?"}]}], **GREEDY_KW)
    assert r.out == shown(expected.text), str(r)


def test_run_on_llama_cpp_gguf_pair_with_mmproj(env, tiny_vl, tmp_path):
    """The same answer from the llama.cpp layout (language GGUF + --mmproj, F32) as from the folder."""
    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.checkpoint.gguf_write import tokenizer_metadata_from_hf, write_gguf
    from qwenkit.checkpoint.mmproj import write_mmproj
    from tests.tiny_vision import tiny_vl_model

    model = tiny_vl_model("qwen2_5_vl")
    (tmp_path / "lm").mkdir()  # apart from the mmproj: the one given by --mmproj is the one used
    lm = write_gguf(model, tmp_path / "lm" / "tiny-vl-f32.gguf",
                    tokenizer_meta=tokenizer_metadata_from_hf(tiny_vl, model.config.vocab_size))
    mmproj = write_mmproj(model, tmp_path / "tiny-vl-mmproj.gguf", open_checkpoint(tiny_vl).image_spec(), "f32")
    args = ["What is it?", "--image", str(PHOTOS / "coffee_wide.webp"), *GREEDY, "--quiet-stats"]
    folder = run_cli("run", str(tiny_vl), *args, env=env)
    pair = run_cli("run", str(lm), *args, "--mmproj", str(mmproj), env=env)
    assert folder.rc == 0 and pair.rc == 0, f"{folder}\n{pair}"
    assert pair.out == folder.out


def test_export_of_a_vl_model_is_the_llama_cpp_pair(env, tiny_vl, tmp_path):
    """`qwenkit export` of a VL folder writes the language GGUF and mmproj-<name> beside it; `run` on the GGUF finds
    that mmproj by itself and answers as the folder does."""
    out = tmp_path / "gguf" / "tiny-vl.gguf"
    r = run_cli("export", str(tiny_vl), "--gguf", str(out), "--type", "f32", env=env)
    assert r.rc == 0, str(r)
    assert r.out.split() == [str(out), str(out.with_name("mmproj-tiny-vl.gguf"))]
    args = ["What is it?", "--image", str(PHOTOS / "astronaut_tall.png"), *GREEDY, "--quiet-stats"]
    pair, folder = run_cli("run", str(out), *args, env=env), run_cli("run", str(tiny_vl), *args, env=env)
    assert pair.rc == 0 and pair.out == folder.out, f"{pair}\n{folder}"


def test_run_with_a_bad_image_is_one_error_line(env, tiny_vl, tiny, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((PHOTOS / "chelsea_exif6.jpg").read_bytes()[:4000])
    assert_one_error_line(run_cli("run", str(tiny_vl), "What?", "--image", str(cut), env=env),
                          str(cut), "JPEG truncated or corrupt")
    assert_one_error_line(run_cli("run", str(tiny_vl), "What?", "--image", str(tmp_path / "none.png"), env=env),
                          "no such file")
    assert_one_error_line(run_cli("run", str(tiny["hf"]), "What?", "--image", str(cut), env=env),
                          "--image", "text-only model")


def test_assistant_with_an_image(env, tiny_vl, tmp_path):
    """`qwenkit assistant --image` gives the model the photo with the question (the trace's first step is an answer
    from the model in this process); a photo that cannot be read is one error line before anything loads."""
    trace = tmp_path / "trace.json"
    r = run_cli("assistant", "--model", str(tiny_vl), "--image", str(PHOTOS / "coffee_wide.webp"), "What is this?",
                "--no-builtin-tools", "--max-steps", "1", "--trace", str(trace), env=env)
    assert r.rc == 0, str(r)
    turn = json.loads(trace.read_text())[0]
    assert turn["prompt"] == "What is this?" and turn["trace"][0]["backends"] == ["device"]
    assert_one_error_line(run_cli("assistant", "--model", str(tiny_vl), "--image", str(tmp_path / "none.jpg"),
                                  "What is this?", env=env), f"{tmp_path / 'none.jpg'}: no such file")


def test_run_prompt_from_stdin(env, tiny, api_models):
    r = run_cli("run", str(tiny["gguf"]), "-", *GREEDY, "--quiet-stats", env=env, stdin="hello\n")
    assert r.rc == 0, str(r)
    expected = api_models("gguf").chat([{"role": "user", "content": "hello\n"}], **GREEDY_KW)
    assert r.out == shown(expected.text)


def test_interactive_answers_each_line_until_eof(env, tiny, api_models):
    turns = ["hello", "how are you?"]
    r = run_cli("run", str(tiny["gguf"]), *GREEDY, env=env, stdin="".join(t + "\n" for t in turns))
    assert r.rc == 0, str(r)
    assert "Traceback" not in r.err
    model, history, expected = api_models("gguf"), [], ""
    for turn in turns:
        history.append({"role": "user", "content": turn})
        answer = model.chat(history, **GREEDY_KW).text
        assert answer
        history.append({"role": "assistant", "content": answer})
        expected += shown(answer)
    assert r.out == expected, str(r)


def real_parameter_count(path) -> int:
    """Parameters of the checkpoint as loaded in fp32 (quantized layers keep weights outside parameters())."""
    import qwenkit

    return sum(p.numel() for p in qwenkit.load(path, pull=False, quant="none").model.parameters())


def expected_tensor_types(kind: str) -> dict[str, int]:
    state = tiny_model("qwen2").state_dict()
    if kind == "hf":
        return {"F32": len(state)}
    two_d = sum(1 for t in state.values() if t.dim() == 2)
    return {"Q8_0": two_d, "F32": len(state) - two_d}


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_info_json(env, tiny, api_models, kind):
    r = run_cli("info", str(tiny[kind]), "--json", env=env)
    assert r.rc == 0 and r.err == "", str(r)
    facts = json.loads(r.out)
    model = api_models(kind)
    assert facts["architecture"] == "qwen2"
    assert facts["format"] == kind
    assert facts["parameters"] == real_parameter_count(tiny[kind])
    assert facts["context_length"] == 256 == model.context_length
    assert facts["layers"] == 3
    assert facts["tensor_types"] == expected_tensor_types(kind)


def test_info_text(env, tiny, api_models):
    r = run_cli("info", str(tiny["gguf"]), env=env)
    assert r.rc == 0 and r.err == "", str(r)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.out.splitlines())
    assert rows["architecture"] == "qwen2"
    assert rows["parameters"].endswith(f"({real_parameter_count(tiny['gguf']):,})")
    assert rows["context length"] == "256"
    types = expected_tensor_types("gguf")
    assert rows["tensor types"] == ", ".join(f"{k} x{n}" for k, n in sorted(types.items()))


def test_bench_json(env, tiny):
    r = run_cli("bench", str(tiny["gguf"]), "--prompt-tokens", "16", "--gen-tokens", "4", "--reps", "1", "--json",
                env=env)
    assert r.rc == 0, str(r)
    result = json.loads(r.out)
    assert result["prompt_tokens"] == 16 and result["gen_tokens"] == 4
    for key in ("prompt_tps", "decode_tps", "peak_memory_gb"):
        assert isinstance(result[key], float) and result[key] > 0, result


def test_pull_list_info_rm_with_the_fake_hub(env, home, tiny_q8):
    ref = "test-org/Tiny-GGUF:tiny-q8_0.gguf"
    fake = FakeHub()
    try:
        fake.add("test-org/Tiny-GGUF", {"tiny-q8_0.gguf": tiny_q8.read_bytes(), "README.md": b"tiny"})
        online = dict(env, HF_ENDPOINT=fake.endpoint)
        del online["HF_HUB_OFFLINE"]
        pulled = run_cli("pull", ref, env=online)
    finally:
        fake.close()
    assert pulled.rc == 0, str(pulled)
    path = Path(pulled.out.strip())
    assert path.is_relative_to(home) and path.read_bytes() == tiny_q8.read_bytes()

    listed = run_cli("list", env=env)  # offline from here on
    assert listed.rc == 0, str(listed)
    header, *rows = listed.out.splitlines()
    assert header.split() == ["NAME", "SIZE", "PATH"]
    assert len(rows) == 1 and rows[0].split()[0] == ref and rows[0].split()[-1] == str(path)

    info = run_cli("info", ref, "--json", env=env)  # the name resolves to the cached file, no network
    assert info.rc == 0 and json.loads(info.out)["path"] == str(path), str(info)

    removed = run_cli("rm", ref, env=env)
    assert removed.rc == 0 and removed.out == f"removed {path.parent}\n", str(removed)
    assert not path.exists()
    empty = run_cli("list", env=env)
    assert empty.rc == 0 and empty.out == "" and "no models cached" in empty.err, str(empty)


# --------------------------------------------------------------------------------------------- real weights


@pytest.mark.real_weights
@pytest.mark.slow
def test_real_model_translates(env, default_gguf):
    r = run_cli("run", str(default_gguf), "Translate into English: 你好，世界", "--temperature", "0",
                "--max-tokens", "16", env=env, timeout=300)
    assert r.rc == 0, str(r)
    assert "hello" in r.out.lower(), str(r)


@pytest.mark.real_weights
@pytest.mark.slow
def kernel_rows(out: str) -> tuple[dict[str, str], dict[str, str]]:
    """`info --kernels` output: the plan's header rows, and each tensor line's kernels by tensor name."""
    plan = out.split("kernels:\n", 1)[1]
    header = dict(line.strip().split(": ", 1) for line in plan.splitlines() if not line.startswith("    "))
    tensors = {line.split()[0]: line for line in plan.splitlines() if line.startswith("    ")}
    return header, tensors


@pytest.mark.parametrize("forced", [None, "reference", "none"])
def test_info_kernels_prints_the_plan(env, tiny, forced):
    from qwenkit.kernels import library

    env = dict(env)
    if forced is not None:
        env["QWENKIT_KERNELS"] = forced
    r = run_cli("info", str(tiny["gguf"]), "--kernels", env=env)
    assert r.rc == 0 and r.err == "", str(r)
    header, tensors = kernel_rows(r.out)
    variant = {None: library.selected(), "reference": "reference", "none": None}[forced]
    if forced == "reference" and not (library.build.LIB_DIR / library.build.library_name("reference")).exists():
        pytest.skip("the reference kernels were not built")
    assert header["kernel variant"].startswith(variant or "none (PyTorch paths)")
    assert header["kv cache"] == "float16"
    q_proj = tensors["blk.*.attn_q.weight"]
    if variant:
        assert f"Q8_0 blocks x int8 (C {variant})" in q_proj and header["attention"] == f"paged, C {variant}"
        assert header["decode layers"].startswith("dense layers on GGUF blocks fused")
    else:
        assert "int8 groups, compiled" in q_proj and "PyTorch" in header["attention"]  # exact: the file's groups
        assert header["decode layers"] == "module by module"
    assert "vector" in tensors["blk.*.attn_norm.weight"]


def test_info_kernels_refuses_an_unknown_variant(env, tiny):
    r = run_cli("info", str(tiny["gguf"]), "--kernels", env={**env, "QWENKIT_KERNELS": "sse9"})
    assert_one_error_line(r, "QWENKIT_KERNELS=sse9", "one of")


def test_run_verbose_prints_the_kernel_plan(env, tiny):
    r = run_cli("run", str(tiny["gguf"]), "hi", "-v", "--max-tokens", "2", "--temperature", "0", env=env)
    assert r.rc == 0, str(r)
    assert "kernel variant: " in r.err and "blk.*.ffn_down.weight" in r.err


def test_real_model_info_from_the_default_cache(env, monkeypatch):
    from qwenkit import hub

    monkeypatch.delenv("QWENKIT_HOME", raising=False)
    if hub.find_cached(hub.DEFAULT_MODEL) is None:
        pytest.skip(f"{hub.DEFAULT_MODEL} is not in the default cache")
    env = dict(env)
    del env["QWENKIT_HOME"]
    r = run_cli("info", hub.DEFAULT_MODEL, env=env, timeout=300)
    assert r.rc == 0 and r.err == "", str(r)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.out.splitlines())
    assert rows["architecture"] == "qwen2"
    assert rows["layers"] == "24"
    assert rows["context length"] == "32768"
    assert set(re.findall(r"(\w+) x\d+", rows["tensor types"])) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}
