"""The OpenAI-compatible server on a loopback port, driven by the official `openai` client, serving
the built-in demo model."""
import asyncio
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from shapes import data_url, png_bytes, shape_image

API_KEY = "test-key"
MODEL = "vlmserve-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for shape, color in [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("cross", "yellow")]:
        (d / f"{color}_{shape}.png").write_bytes(png_bytes(shape_image(shape, color)))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return d


@pytest.fixture(scope="module")
def http_media(media_dir):
    """A local HTTP server that serves the media directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module", params=["--no-async-scheduling", "--async-scheduling"])
def server(media_dir, request):
    """The demo server, stepping one step at a time and with async scheduling (the default on CUDA)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.entrypoints.cli", "serve", "--port", str(port), request.param,
           "--api-key", API_KEY, "--limit-mm-per-prompt", "image=2", "--dtype", "float32",
           "--allowed-local-media-path", str(media_dir), "--allowed-media-domains", "127.0.0.1",
           "--max-model-len", "1024", "--log-interval", "2"]
    log = open(media_dir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + (media_dir / "server.log").read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


def ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 10)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)
    return r


def answer(r, i=0):
    return r.choices[i].message.content.strip()


def metric(server, name) -> float:
    text = httpx.get(server + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---- the Vision API ----------------------------------------------------------------------
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").status_code == 200
    assert "version" in httpx.get(server + "/version").json()


def test_image_as_data_url(client):
    r = ask(client, [image_part(data_url(shape_image("circle", "red"))), text_part("What color is the shape?")])
    assert answer(r) == "red" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 64 and r.usage.completion_tokens >= 1


def test_image_as_file_url(client, media_dir):
    r = ask(client, [image_part(f"file://{media_dir}/blue_square.png"), text_part("What shape is this?")])
    assert answer(r) == "square"


def test_image_as_http_url(client, http_media):
    r = ask(client, [image_part(f"{http_media}/green_triangle.png"), text_part("Describe the image.")])
    assert answer(r) == "a green triangle"


def test_text_before_and_after_the_image(client):
    img = data_url(shape_image("cross", "purple"))
    before = ask(client, [text_part("What shape is this?"), image_part(img)])
    after = ask(client, [image_part(img), text_part("What shape is this?")])
    assert answer(before) == answer(after) == "cross"


def test_two_images(client, media_dir):
    first = f"file://{media_dir}/red_circle.png"
    second = data_url(shape_image("square", "blue"))
    r1 = ask(client, [image_part(first), image_part(second), text_part("What color is the shape in the first image?")])
    r2 = ask(client, [image_part(first), image_part(second), text_part("What color is the shape in the second image?")])
    assert (answer(r1), answer(r2)) == ("red", "blue")


def test_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, stream=True, temperature=0, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [image_part(data_url(shape_image("triangle", "orange"))),
                                               text_part("Describe the image.")]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "an orange triangle" or text.strip() == "a orange triangle"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_streaming_holds_back_what_may_become_a_stop_string(client):
    """The streamed chat text and completion text equal the whole replies: the tail that could start a
    stop string is held back until the engine decides, and the stop string itself never arrives."""
    content = [image_part(data_url(shape_image("circle", "purple"))), text_part("Describe the image.")]
    whole = ask(client, content, stop=["ple ci"])
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].stop_reason == "ple ci"
    assert answer(whole) == "a pur"  # "a purple circle", cut where the stop string began
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, temperature=0, stop=["ple ci"],
                                                 messages=[{"role": "user", "content": content}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    prompt = "USER: What shape is this? ASSISTANT: a purple"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=["ir"])
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=["ir"],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text


def test_n_and_logprobs(client):
    r = ask(client, [image_part(data_url(shape_image("square", "green"))), text_part("What color is the shape?")],
            n=2, temperature=0.8, seed=7, logprobs=True, top_logprobs=3)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.message.content.strip() == "green"  # the model is sure
        lp = c.logprobs.content
        assert lp and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
        assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[1].logprob
        assert lp[0].top_logprobs[0].logprob > -0.1


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL, prompt="USER: What shape is this? ASSISTANT:", max_tokens=5,
                                  temperature=0, logprobs=2)
    assert r.choices[0].logprobs.token_logprobs and r.usage.prompt_tokens > 3


def test_tokenize_detokenize(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": "What shape is this?"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert "What shape is this?" in d["prompt"]


# ---- concurrency -------------------------------------------------------------------------
def test_64_concurrent_requests_are_batched_and_answer_as_alone(server, client):
    shapes = ["circle", "square", "triangle", "cross"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    jobs = [(shapes[i % 4], colors[i % 6], ["What color is the shape?", "What shape is this?", "Describe the image."][i % 3])
            for i in range(64)]
    urls = {(s, c): data_url(shape_image(s, c)) for s, c, _ in jobs}

    def messages(s, c, q):
        return [{"role": "user", "content": [image_part(urls[(s, c)]), text_part(q)]}]

    alone = {}
    for s, c, q in set(jobs):
        alone[(s, c, q)] = answer(ask(client, messages(s, c, q)[0]["content"]))
    before = metric(server, "vlmserve:max_step_batch_size")

    async def run_all():
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        rs = await asyncio.gather(*(ac.chat.completions.create(model=MODEL, messages=messages(*j), temperature=0,
                                                               max_tokens=10) for j in jobs))
        await ac.close()
        return rs

    results = asyncio.run(run_all())
    for j, r in zip(jobs, results):
        assert answer(r) == alone[j]
    assert before < 16 <= metric(server, "vlmserve:max_step_batch_size")  # the engine batched them
    for s, c, q in set(jobs):  # and they are right
        want = {"What color is the shape?": c, "What shape is this?": s}.get(q)
        if want:
            assert alone[(s, c, q)] == want


# ---- bad input ---------------------------------------------------------------------------
def _status(exc_info):
    return exc_info.value.status_code


def test_bad_requests_get_4xx_and_the_server_goes_on(server, client, media_dir):
    img = data_url(shape_image("circle", "red"))
    cases = [
        ([image_part("data:image/png;base64,AAAA"), text_part("x")], {}, 400, "cannot decode"),
        ([image_part(f"file://{media_dir}/broken.png"), text_part("x")], {}, 400, "cannot decode"),
        ([image_part(img), image_part(img), image_part(img), text_part("x")], {}, 400, "more than the limit of 2"),
        ([image_part(f"file://{media_dir}/../../etc/passwd"), text_part("x")], {}, 400, "outside"),
        ([image_part("http://localhost:1/x.png"), text_part("x")], {}, 400, "non-public"),
        ([image_part("ftp://example.com/x.png"), text_part("x")], {}, 400, "scheme"),
        ([text_part("word " * 2000)], {}, 400, "maximum context length"),
        ([text_part("hi")], {"temperature": -1}, 400, "temperature"),
        ([text_part("hi")], {"max_tokens": 5000}, 400, "maximum context length"),
        ([{"type": "audio", "x": 1}], {}, 400, "unsupported content part"),
    ]
    for content, kw, status, message in cases:
        with pytest.raises(openai.APIStatusError) as e:
            ask(client, content, **kw)
        assert _status(e) == status, (content, e.value)
        assert message in e.value.message, e.value.message
        body = e.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        # and the next good request is answered right
    assert answer(ask(client, [image_part(img), text_part("What color is the shape?")])) == "red"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    bad_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert answer(ask(client, [image_part(img), text_part("What shape is this?")])) == "circle"


def test_video_to_a_model_without_video_is_a_400(client, media_dir):
    # The demo model (LLaVA) takes images only: a video part is refused, naming the problem,
    # before the video is fetched or decoded; streaming or not, with sampling overrides or not.
    video = {"type": "video_url", "video_url": {"url": f"file://{media_dir}/clip.mp4"}}
    for kw in ({}, {"stream": True}, {"extra_body": {"mm_processor_kwargs": {"fps": 1}}}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, [video, text_part("What happens?")], **kw)
        assert "takes no video input" in e.value.message
        assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "stream": True, "max_tokens": 600, "ignore_eos": True, "temperature": 1.0,
            "messages": [{"role": "user", "content": [image_part(data_url(shape_image("circle", "blue"))),
                                                      text_part("Describe the image.")]}]}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert metric(server, "vlmserve:num_requests_running") == 1
            assert metric(server, "vlmserve:kv_cache_usage_perc") > 0
    deadline = time.time() + 10
    while time.time() < deadline and (metric(server, "vlmserve:num_requests_running") or
                                      metric(server, "vlmserve:kv_cache_usage_perc")):
        time.sleep(0.1)
    assert metric(server, "vlmserve:num_requests_running") == 0
    assert metric(server, "vlmserve:kv_cache_usage_perc") == 0


def test_metrics(server):
    text = httpx.get(server + "/metrics").text
    for name in ["vlmserve:request_success_total", "vlmserve:prompt_tokens_total", "vlmserve:generation_tokens_total",
                 "vlmserve:time_to_first_token_seconds_bucket", "vlmserve:time_per_output_token_seconds_bucket",
                 "vlmserve:kv_cache_usage_perc", "vlmserve:num_requests_waiting"]:
        assert name in text


# ---- offline chat is the same path ---------------------------------------------------------
def test_offline_chat_matches_server(client, media_dir):
    from vlmserve import LLM, SamplingParams

    llm = LLM(dtype="float32", max_model_len=1024, limit_mm_per_prompt={"image": 2},
              allowed_local_media_path=str(media_dir))
    convs = [[{"role": "user", "content": [image_part(f"file://{media_dir}/yellow_cross.png"),
                                           text_part("Describe the image.")]}],
             [{"role": "user", "content": [image_part(data_url(shape_image("square", "purple"))),
                                           image_part(f"file://{media_dir}/red_circle.png"),
                                           text_part("What color is the shape in the second image?")]}]]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for conv, out in zip(convs, outs):
        server_text = client.chat.completions.create(model=MODEL, messages=conv, temperature=0,
                                                     max_tokens=10).choices[0].message.content
        assert out.outputs[0].text == server_text
    assert outs[0].outputs[0].text.strip() == "a yellow cross"
    assert outs[1].outputs[0].text.strip() == "red"
    video = {"type": "video_url", "video_url": {"url": f"file://{media_dir}/clip.mp4"}}
    with pytest.raises(ValueError, match="takes no video input"):
        llm.chat([{"role": "user", "content": [video, text_part("What happens?")]}], use_tqdm=False)
