"""`qwenkit serve` on a tiny vision-language checkpoint, as a real subprocess, driven by the official openai client.

Images go in as data: URLs (the only kind a server takes by default). The answers are compared with the Python API's
on the same conversation in this process; bad images get a 400 with an OpenAI error body naming what is wrong.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qwenkit
from tests.e2e.test_serve import KEY, Server, assert_error, serving
from tests.tiny_vision import tiny_vl_folder
from tests.unit.test_image_preprocess import png_header

openai = pytest.importorskip("openai")

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
NAME = "tiny-vl"


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def ask(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_vl_folder(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl")


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    s = Server(folder, tmp_path_factory.mktemp("serve-vision") / "server.log", "--api-key", KEY,
               "--served-model-name", NAME, "--kv-dtype", "f32", "--quant", "none")
    yield from serving(s)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(folder):
    model = qwenkit.load(str(folder), quant="none")
    model.start_engine(kv_dtype=__import__("torch").float32)
    return model


def greedy(client, messages, max_tokens: int = 12):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=max_tokens)


def test_models_say_the_model_takes_images(server):
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["input_modalities"] == ["text", "image"]


def test_image_answer_equals_the_python_api(client, local):
    messages = ask(data_url(photo("chelsea_exif6.jpg")))
    r = greedy(client, messages)
    expected = local.chat(messages, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(local.prepare_chat(messages).prompt_ids)


def test_image_and_text_requests_batch_together(client, local):
    """Requests with images, with other images and without any run in the same engine steps and each gets the
    answer it gets alone."""
    conversations = [ask(data_url(photo("chelsea_exif6.jpg"))),
                     [{"role": "user", "content": "Hello, what is your name?"}],
                     ask(data_url(photo("coffee_wide.webp"), "image/webp"), "Describe it."),
                     ask(data_url(photo("astronaut_tall.png"), "image/png"))]
    alone = [local.chat(m, temperature=0, max_tokens=12).text for m in conversations]
    with ThreadPoolExecutor(len(conversations)) as pool:
        together = list(pool.map(lambda m: greedy(client, m).choices[0].message.content, conversations))
    assert together == alone


def test_a_repeated_image_is_served_from_the_prefix_cache(server, client):
    """The second ask of the same photo reuses the first one's keys and values (image tokens included); a
    different photo after the same text does not."""
    def hits() -> float:
        return server.wait_idle()["qwenkit_prefix_cache_hits_total"]

    same = ask(data_url(photo("coffee_wide.webp"), "image/webp"), "Once more: what is it?")
    greedy(client, same, max_tokens=2)
    before = hits()
    greedy(client, same, max_tokens=2)
    repeated = hits() - before
    before = hits()
    greedy(client, ask(data_url(photo("astronaut_tall.png"), "image/png"), "Once more: what is it?"), max_tokens=2)
    other = hits() - before
    assert repeated > other + 16  # the photo's 16 image tokens come from the cache only when it is the same photo


@pytest.mark.parametrize("url, needles", [
    (data_url(b"this is not an image"), ["image 1 of the request", "not an image"]),
    (data_url(photo("chelsea_exif6.jpg")[:5000]), ["JPEG truncated or corrupt"]),
    (data_url(b"GIF89a" + b"\0" * 40, "image/gif"), ["format GIF not supported"]),
    (data_url(png_header(8000, 8000), "image/png"), ["8000x8000 pixels is over the limit"]),
    ("data:image/png;base64,%%%", ["not valid base64"]),
    ("data:image/png,raw", ["data:<type>;base64"]),
    ("https://example.com/cat.jpg", ["http(s) image URLs are not accepted", "--allow-image-urls"]),
    ("/etc/hostname", ["local files are not accepted"]),
])
def test_bad_images_get_a_400(server, url, needles):
    body = {"model": NAME, "messages": ask(url), "max_tokens": 4}
    status, _, payload = server.request("POST", "/v1/chat/completions", body)
    assert_error(status, payload, 400, *needles)


def test_too_many_images_for_the_context(server):
    """A prompt whose images do not fit the context is refused before any work (400, context_length_exceeded as
    for long text)."""
    many = [{"type": "image_url", "image_url": {"url": data_url(photo("coffee_wide.webp"), "image/webp")}}] * 40
    body = {"model": NAME, "messages": [{"role": "user", "content": many}], "max_tokens": 4}
    status, _, payload = server.request("POST", "/v1/chat/completions", body)
    assert_error(status, payload, 400, "tokens")
