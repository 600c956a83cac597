"""Video decoding and loading: small real videos made here with PyAV (64x48, 3 s at 10 fps, frame i
a solid colour that encodes i), decoded through `vlmserve.multimodal.video` and `MediaConnector`,
and the chat path that takes `video_url` parts to `multi_modal_data["video"]`."""
import asyncio
import base64
import io
from types import SimpleNamespace

import av
import numpy as np
import pytest

from vlmserve.engine.text_encoder import text_encoder
from vlmserve.entrypoints.chat_utils import ChatError, prepare_chat
from vlmserve.multimodal.inputs import VideoFrames
from vlmserve.multimodal.media import MediaConnector, MediaError
from vlmserve.multimodal.video import (VideoOptions, decode_video, load_video, plan_samples,
                                       split_video_kwargs)

W, H, N, RATE = 64, 48, 30, 10


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's colour: far enough from the others' to survive lossy codecs and GIF's palette."""
    return (i % 6) * 51, (i // 6) * 51, 0


def frame_ids(video: VideoFrames) -> list[int]:
    means = video.frames.reshape(len(video), -1, 3).mean(axis=1)
    return [int(round(r / 51)) + 6 * int(round(g / 51)) for r, g, _ in means]


def encode(fmt: str, codec: str, pix_fmt: str = "yuv420p", options: dict | None = None,
           n: int = N, width: int = W, height: int = H) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=RATE, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(n):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[:] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _h264_codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # a wheel without x264
        return "mpeg4"


FORMATS = {"mp4": ("mp4", _h264_codec(), "yuv420p"), "webm": ("webm", "libvpx-vp9", "yuv420p"),
           "gif": ("gif", "gif", "rgb8")}


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    return {name: encode(*spec) for name, spec in FORMATS.items()}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, videos):
    d = tmp_path_factory.mktemp("videos")
    (d / "clip.mp4").write_bytes(videos["mp4"])
    (d / "broken.mp4").write_bytes(videos["mp4"][: len(videos["mp4"]) // 2])
    return d


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FORMATS))
def test_samples_at_the_target_fps(videos, name):
    video = decode_video(videos[name], VideoOptions())  # 2 fps: one frame in five, from the first
    assert video.frames.dtype == np.uint8 and video.frames.shape == (6, H, W, 3)
    assert frame_ids(video) == [0, 5, 10, 15, 20, 25]
    assert video.fps == pytest.approx(2.0)


@pytest.mark.parametrize("name", list(FORMATS))
def test_samples_a_fixed_count_evenly(videos, name):
    video = decode_video(videos[name], VideoOptions(num_frames=8))  # every 3/8 s
    assert frame_ids(video) == [0, 3, 7, 11, 15, 18, 22, 26]
    assert video.fps == pytest.approx(8 / 3)


def test_frame_budget_spreads_the_samples_and_records_their_rate(videos):
    video = decode_video(videos["mp4"], VideoOptions(fps=2.0, max_frames=4))
    assert frame_ids(video) == [0, 7, 15, 22]
    assert video.fps == pytest.approx(4 / 3)


def test_never_more_frames_than_the_video_has(videos):
    video = decode_video(videos["webm"], VideoOptions(fps=100.0, max_frames=1000))
    assert frame_ids(video) == list(range(N))
    assert video.fps == pytest.approx(RATE)
    assert frame_ids(decode_video(videos["webm"], VideoOptions(num_frames=1))) == [0]


def test_plan_picks_the_frame_on_screen_at_each_sample_time():
    times = [0.0, 0.1, 0.35, 0.4]  # variable frame rate; the last frame lasts until 0.6 s
    picks, fps = plan_samples(times, 0.6, VideoOptions(fps=4.0))
    assert picks == [0, 1, 3] and fps == 4.0  # samples at 0, 0.25, 0.5 s


def test_pixel_budget_downscales_keeping_the_aspect(videos):
    video = decode_video(videos["mp4"], VideoOptions(max_pixels=W * H // 4))
    assert video.frames.shape == (6, H // 2, W // 2, 3)
    assert frame_ids(video) == [0, 5, 10, 15, 20, 25]


def test_skipping_keyframe_groups_gives_the_frames_a_full_decode_gives():
    # Short keyframe groups with B-frames: the sparse decode skips whole groups.
    data = encode("mp4", _h264_codec(), options={"g": "4", "bf": "2"} if _h264_codec() == "libx264" else {"g": "4"})
    sparse = decode_video(data, VideoOptions(num_frames=5))
    with av.open(io.BytesIO(data)) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert frame_ids(sparse) == [0, 6, 12, 18, 24]
    for got, i in zip(sparse.frames, [0, 6, 12, 18, 24]):
        assert np.abs(got.astype(int) - every[i]).max() <= 2


def test_raw_stream_without_timestamps():
    video = decode_video(encode("h264", "libx264"), VideoOptions()) if _h264_codec() == "libx264" \
        else pytest.skip("no x264")
    assert frame_ids(video) == [0, 5, 10, 15, 20, 25] and video.fps == pytest.approx(2.0)


# ---- bad input ------------------------------------------------------------------------------
def test_garbage_is_a_clear_media_error():
    with pytest.raises(MediaError, match="cannot read the video"):
        decode_video(b"\x00\x01 certainly not a video" * 50)


def test_truncated_file_is_a_clear_media_error(videos):
    with pytest.raises(MediaError, match="cannot (read|decode) the video"):
        decode_video(videos["mp4"][: len(videos["mp4"]) // 2])


def test_audio_only_file_has_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    with pytest.raises(MediaError, match="no video stream"):
        decode_video(buf.getvalue())


def test_playlists_are_not_followed(tmp_path, videos):
    (tmp_path / "a.mp4").write_bytes(videos["mp4"])
    playlist = f"#EXTM3U\n#EXTINF:3,\nfile://{tmp_path}/a.mp4\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile {tmp_path}/a.mp4\n".encode()
    for data in (playlist, concat):
        with pytest.raises(MediaError, match="cannot read the video"):
            decode_video(data)


def test_decode_time_limit(videos):
    with pytest.raises(MediaError, match="took longer than"):
        decode_video(videos["mp4"], VideoOptions(decode_timeout=1e-9))


def test_request_options_are_checked_and_cannot_raise_the_budget():
    base = VideoOptions(max_frames=16)
    assert base.with_request({"max_frames": 100}).max_frames == 16
    assert base.with_request({"max_frames": 4, "fps": 1}) == VideoOptions(fps=1.0, max_frames=4)
    for bad in ({"fps": -1}, {"fps": "2"}, {"num_frames": 0}, {"num_frames": 2.5}, {"fps": 1, "num_frames": 4}):
        with pytest.raises(MediaError, match="fps|num_frames"):
            base.with_request(bad)
    assert split_video_kwargs({"fps": 1, "num_frames": 2, "max_pixels": 9}) == ({"fps": 1, "num_frames": 2},
                                                                                {"max_pixels": 9})


def test_load_video_helper(media_dir, videos):
    from_path = load_video(media_dir / "clip.mp4", num_frames=3)
    from_bytes = load_video(videos["mp4"], num_frames=3)
    assert frame_ids(from_path) == frame_ids(from_bytes) == [0, 10, 20]
    assert load_video(str(media_dir / "clip.mp4"), fps=1, max_pixels=W * H // 4).frames.shape == (3, H // 2, W // 2, 3)


# ---- MediaConnector -------------------------------------------------------------------------
def test_data_and_file_urls(media_dir, videos):
    conn = MediaConnector(allowed_local_media_path=str(media_dir))
    v = asyncio.run(conn.load_video(data_url(videos["webm"], "video/webm")))
    assert isinstance(v, VideoFrames) and frame_ids(v) == [0, 5, 10, 15, 20, 25]
    v = asyncio.run(conn.load_video((media_dir / "clip.mp4").as_uri(), num_frames=4))
    assert frame_ids(v) == [0, 7, 15, 22] and v.fps == pytest.approx(4 / 3)


def test_file_url_refusals(media_dir, tmp_path_factory, videos):
    outside = tmp_path_factory.mktemp("elsewhere") / "clip.mp4"
    outside.write_bytes(videos["mp4"])
    conn = MediaConnector(allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
        asyncio.run(conn.load_video(outside.as_uri()))
    with pytest.raises(MediaError, match="cannot (read|decode) the video from file://"):
        asyncio.run(conn.load_video((media_dir / "broken.mp4").as_uri()))
    with pytest.raises(MediaError, match="fps"):
        asyncio.run(conn.load_video((media_dir / "clip.mp4").as_uri(), fps=0))


def test_video_size_cap(media_dir, videos, monkeypatch):
    monkeypatch.setenv("VLMSERVE_MAX_VIDEO_BYTES", "1000")
    conn = MediaConnector(allowed_local_media_path=str(media_dir))
    for url in (data_url(videos["mp4"]), (media_dir / "clip.mp4").as_uri()):
        with pytest.raises(MediaError, match="larger than 1000 bytes"):
            asyncio.run(conn.load_video(url))


def test_server_wide_defaults_from_the_environment(videos, monkeypatch):
    monkeypatch.setenv("VLMSERVE_VIDEO_FPS", "1")
    monkeypatch.setenv("VLMSERVE_VIDEO_MAX_PIXELS", str(W * H // 4))
    v = asyncio.run(MediaConnector().load_video(data_url(videos["mp4"])))
    assert frame_ids(v) == [0, 10, 20] and v.frames.shape[1:3] == (H // 2, W // 2)


# ---- the chat path, with a stand-in engine for a model that takes videos ---------------------
class _Tokenizer:
    chat_template = "unused"

    def apply_chat_template(self, conversation, **kw):
        return "".join(m["content"] for m in conversation)

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def _engine(modalities):
    calls = []
    proc = SimpleNamespace(modalities=modalities, mm_processor_kwargs={"fps": 1})

    def process_multimodal(ids, mm_data, kwargs):
        calls.append((mm_data, kwargs))
        return ids, []
    tok = _Tokenizer()
    engine = SimpleNamespace(mm_processor=proc, tokenizer=tok, encode_text=text_encoder(tok), limit_mm_per_prompt={},
                             model_config=SimpleNamespace(model="."), process_multimodal=process_multimodal,
                             placeholder_str=lambda m, i: f"<{m}>")
    return engine, calls


def _video_message(url):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]


def test_chat_video_parts_reach_multi_modal_data(media_dir):
    engine, calls = _engine(("image", "video"))
    conn = MediaConnector(allowed_local_media_path=str(media_dir))
    url = (media_dir / "clip.mp4").as_uri()
    text, _, _ = asyncio.run(prepare_chat(engine, _video_message(url), None, "string", conn,
                                          mm_processor_kwargs={"num_frames": 4, "max_pixels": 1000}))
    assert text.startswith("<video>")
    (mm_data, kwargs), = calls
    assert kwargs == {"max_pixels": 1000}  # sampling keys were the loader's
    (video,) = mm_data["video"]
    assert isinstance(video, VideoFrames) and frame_ids(video) == [0, 7, 15, 22]
    # No request override: the engine's mm_processor_kwargs give the rate.
    asyncio.run(prepare_chat(engine, _video_message(url), None, "string", conn))
    assert frame_ids(calls[-1][0]["video"][0]) == [0, 10, 20] and calls[-1][1] == {}


def test_chat_refuses_video_for_a_model_without_video_before_loading_it():
    engine, calls = _engine(("image",))
    # The URL would fail to load: the refusal must come first.
    for fmt in ("string", "openai"):
        with pytest.raises(ChatError, match="takes no video input"):
            asyncio.run(prepare_chat(engine, _video_message("file:///nowhere.mp4"), None, fmt, MediaConnector()))
    assert not calls


def test_request_sampling_replaces_the_servers():
    from vlmserve.multimodal.video import layer_video_kwargs
    assert layer_video_kwargs({"fps": 1, "max_frames": 8}, {"num_frames": 4}) == {"max_frames": 8, "num_frames": 4}
    assert layer_video_kwargs({"num_frames": 4}, {"max_frames": 2}) == {"num_frames": 4, "max_frames": 2}
