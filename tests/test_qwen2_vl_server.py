"""Qwen2-VL through `vlmserve serve`, driven by the official `openai` client: chat requests with a
`video_url` (a `data:` URL and a `file://` URL), with four image frames (the "video as frames"
pattern), streamed, and with per-request `mm_processor_kwargs`. Every reply is checked against
offline `LLM.generate` in this process on the same decoded frames: the same prompt token count,
the same greedy text, the same token logprobs (within 1e-4).

The server samples videos at 8 frames (`--mm-processor-kwargs '{"num_frames": 8}'`): a key of the
video loader, which the model's processor must accept and ignore."""
import base64
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from PIL import Image

from clips import mp4_bytes
from vlmserve import LLM, SamplingParams
from vlmserve.multimodal.video import load_video
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

MAX_TOKENS = 6
SERVER_VIDEO_FRAMES = 8
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
ENGINE_ARGS = dict(max_model_len=1024, num_kv_blocks=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp("qwen2_vl")))


@pytest.fixture(scope="module")
def clip():
    return mp4_bytes(num_frames=30, rate=10)  # 3 s, 112x84: 12 merged tokens per frame pair


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, clip):
    d = tmp_path_factory.mktemp("media")
    (d / "clip.mp4").write_bytes(clip)
    return d


@pytest.fixture(scope="module")
def server(model_dir, media_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.entrypoints.cli", "serve", model_dir, "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
           "--num-kv-blocks", str(ENGINE_ARGS["num_kv_blocks"]),
           "--limit-mm-per-prompt", '{"image": 4, "video": 1}',
           "--mm-processor-kwargs", f'{{"num_frames": {SERVER_VIDEO_FRAMES}}}',
           "--allowed-local-media-path", str(media_dir)]
    log_path = media_dir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + log_path.read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("server did not start: " + log_path.read_text()[-3000:])
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, dtype="float32", limit_mm_per_prompt={"image": 4, "video": 1}, **ENGINE_ARGS)


# ---- helpers -----------------------------------------------------------------------------------
def video_data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the server sees exactly these pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts, text: str) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(img)}}


def ask(client, model_dir, messages, mm_processor_kwargs=None, **kw):
    extra = {"ignore_eos": True}
    if mm_processor_kwargs is not None:
        extra["mm_processor_kwargs"] = mm_processor_kwargs
    return client.chat.completions.create(model=model_dir, messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0, logprobs=True, top_logprobs=1, extra_body=extra,
                                          **kw)


def reference(offline, placeholders: str, text: str, mm_data: dict, mm_processor_kwargs=None):
    """Offline generation of the prompt the chat template renders, on frames decoded here."""
    prompt = f"{SYSTEM}<|im_start|>user\n{placeholders}{text}<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    ids = offline.get_tokenizer()(prompt, add_special_tokens=False).input_ids  # as chat prompts are
    request = {"prompt_token_ids": ids, "multi_modal_data": mm_data}
    if mm_processor_kwargs:
        request["mm_processor_kwargs"] = mm_processor_kwargs
    return offline.generate(request, params, use_tqdm=False)[0]


def assert_same(reply, ref) -> None:
    """The server's reply is the offline output: prompt length, text, and each token's logprob."""
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert reply.usage.completion_tokens == MAX_TOKENS == len(ref.outputs[0].token_ids)
    assert choice.message.content == ref.outputs[0].text
    want = [pos[t].logprob for t, pos in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)]
    got = [entry.logprob for entry in choice.logprobs.content]
    assert got == pytest.approx(want, abs=1e-4)


def n_video_tokens(frames: int) -> int:
    return -(-frames // 2) * 12  # frame pairs x (84/28) x (112/28) merged tokens


# ---- video_url ---------------------------------------------------------------------------------
def test_video_data_url_matches_offline_on_the_same_frames(client, model_dir, offline, clip):
    reply = ask(client, model_dir, user(video_part(video_data_url(clip)), text="What happens?"))
    frames = load_video(clip, num_frames=SERVER_VIDEO_FRAMES)  # the server-wide sampling
    assert len(frames) == SERVER_VIDEO_FRAMES
    ref = reference(offline, VIDEO, "What happens?", {"video": frames})
    assert ref.prompt_token_ids.count(offline.llm_engine.mm_processor.placeholder_token_id("video")) == \
        n_video_tokens(SERVER_VIDEO_FRAMES)
    assert_same(reply, ref)


def test_video_file_url_gives_the_data_url_reply(client, model_dir, media_dir, clip):
    by_file = ask(client, model_dir, user(video_part((media_dir / "clip.mp4").as_uri()), text="What happens?"))
    by_data = ask(client, model_dir, user(video_part(video_data_url(clip)), text="What happens?"))
    assert by_file.usage.prompt_tokens == by_data.usage.prompt_tokens
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    outside = media_dir.parent / "elsewhere.mp4"
    outside.write_bytes(clip)
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media-path"):
        ask(client, model_dir, user(video_part(outside.as_uri()), text="What happens?"))


@pytest.mark.parametrize("kwargs, frames", [({"num_frames": 4}, 4), ({"fps": 1}, 3), ({"fps": 4}, 12)])
def test_per_request_video_sampling_changes_the_prompt(client, model_dir, offline, clip, kwargs, frames):
    """A request's fps or num_frames replaces the server's num_frames; the prompt grows or shrinks
    with the frames, and the reply is still offline's on those frames."""
    reply = ask(client, model_dir, user(video_part(video_data_url(clip)), text="What happens?"),
                mm_processor_kwargs=kwargs)
    decoded = load_video(clip, **kwargs)
    assert len(decoded) == frames
    ref = reference(offline, VIDEO, "What happens?", {"video": decoded})
    assert_same(reply, ref)
    default_tokens = len(reference(offline, VIDEO, "What happens?",
                                   {"video": load_video(clip, num_frames=SERVER_VIDEO_FRAMES)}).prompt_token_ids)
    assert reply.usage.prompt_tokens - default_tokens == n_video_tokens(frames) - n_video_tokens(SERVER_VIDEO_FRAMES)


# ---- image frames ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames(clip):
    return [Image.fromarray(f) for f in load_video(clip, num_frames=4).frames]


def test_four_image_frames_match_offline(client, model_dir, offline, frames):
    messages = user(*(image_part(f) for f in frames), text="Describe these frames.")
    reply = ask(client, model_dir, messages)
    ref = reference(offline, IMAGE * 4, "Describe these frames.", {"image": frames})
    assert_same(reply, ref)
    # a smaller pixel budget for this request only: fewer tokens per frame, offline agrees
    small = ask(client, model_dir, messages, mm_processor_kwargs={"max_pixels": 28 * 28 * 4})
    ref_small = reference(offline, IMAGE * 4, "Describe these frames.", {"image": frames},
                          {"max_pixels": 28 * 28 * 4})
    assert small.usage.prompt_tokens < reply.usage.prompt_tokens
    assert_same(small, ref_small)


def test_streamed_frames_equal_the_whole_reply(client, model_dir, frames):
    messages = user(*(image_part(f) for f in frames), text="Describe these frames.")
    whole = ask(client, model_dir, messages)
    stream = ask(client, model_dir, messages, stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == MAX_TOKENS


def test_too_many_frames_is_a_400(client, model_dir, frames):
    with pytest.raises(openai.BadRequestError, match="5 images in one prompt, more than the limit of 4"):
        ask(client, model_dir, user(*(image_part(f) for f in frames + frames[:1]), text="too many"))
