"""Decoding a video (the bytes of any container FFmpeg reads: mp4, webm, mkv, gif, ...) into
`VideoFrames`: frames sampled uniformly in time, at a target rate or to a fixed count, within a
frame budget and a per-frame pixel budget, in bounded time and memory.

Decoding takes two passes over the (in-memory) bytes. The first only demuxes: it reads each
packet's timestamp and keyframe flag, which gives the exact frame times whatever the container's
metadata says. The second decodes only the keyframe groups (GOPs) that hold a sampled frame,
skipping the packets of the others, and converts to RGB (downscaled in the same swscale call)
only the sampled frames."""
from __future__ import annotations

import io
import math
import os
import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass, replace

import numpy as np

from vlmserve.multimodal.inputs import VideoFrames
from vlmserve.multimodal.media import MediaError

DEFAULT_FPS = 2.0  # as Qwen2-VL samples videos
# 32 frames bound the cost of one video: a Qwen2-VL-style model merges frame pairs, so 32 frames
# at the default pixel budget take about 16 x 768 = 12k tokens and 32 x 1.8 MB of RGB, about the
# most one request should put on the encoder and in memory by default.
DEFAULT_MAX_FRAMES = 32
DEFAULT_MAX_PIXELS = 768 * 28 * 28  # Qwen2-VL's per-frame video budget; larger frames are downscaled
DEFAULT_DECODE_TIMEOUT = 30.0  # seconds
# A frame larger than 8K would take gigabytes to decode at all: refuse it before decoding.
MAX_SOURCE_PIXELS = 8192 * 4320
MAX_SOURCE_FRAMES = 1 << 20  # 9 h at 30 fps; bounds the frame index (~100 bytes a frame)

# Demuxers of media files. Refusing the others (playlists, concat lists, image sequences,
# network formats) keeps FFmpeg from opening anything but the bytes it was given.
ALLOWED_DEMUXERS = ("mov", "matroska", "avi", "gif", "apng", "mpegts", "flv", "ogg", "mpeg", "asf",
                    "ivf", "obu", "h264", "hevc", "m4v", "mjpeg")

# Keys of `mm_processor_kwargs` that steer decoding; they are consumed by the loader, not passed on
# to the model's processor (the frames it gets are already sampled).
VIDEO_SAMPLING_KEYS = ("fps", "num_frames", "max_frames")


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class VideoOptions:
    """How to sample a video. `num_frames`, when set, wins over `fps`."""
    fps: float = DEFAULT_FPS
    num_frames: int | None = None
    max_frames: int = DEFAULT_MAX_FRAMES
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT

    @classmethod
    def from_env(cls) -> VideoOptions:
        """Server-wide defaults: VLMSERVE_VIDEO_FPS, _MAX_FRAMES, _MAX_PIXELS, _DECODE_TIMEOUT."""
        return cls(fps=_env_float("VLMSERVE_VIDEO_FPS", DEFAULT_FPS),
                   max_frames=_env_int("VLMSERVE_VIDEO_MAX_FRAMES", DEFAULT_MAX_FRAMES),
                   max_pixels=_env_int("VLMSERVE_VIDEO_MAX_PIXELS", DEFAULT_MAX_PIXELS),
                   decode_timeout=_env_float("VLMSERVE_VIDEO_DECODE_TIMEOUT", DEFAULT_DECODE_TIMEOUT))

    def with_request(self, overrides: dict) -> VideoOptions:
        """Per-request `fps`, `num_frames`, `max_frames` (which may lower the budget, not raise it)."""
        fps, num_frames = overrides.get("fps"), overrides.get("num_frames")
        max_frames = overrides.get("max_frames")
        if fps is not None and num_frames is not None:
            raise MediaError("give the video's 'fps' or its 'num_frames', not both")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                                or not math.isfinite(fps) or fps <= 0):
            raise MediaError(f"the video 'fps' must be a positive number, got {fps!r}")
        for name, value in (("num_frames", num_frames), ("max_frames", max_frames)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MediaError(f"the video '{name}' must be a positive integer, got {value!r}")
        return replace(self, fps=float(fps) if fps is not None else self.fps,
                       num_frames=num_frames if num_frames is not None else self.num_frames,
                       max_frames=min(max_frames, self.max_frames) if max_frames else self.max_frames)

    def check(self) -> None:
        if not (self.fps > 0 and self.max_frames >= 1 and self.max_pixels >= 1 and self.decode_timeout > 0):
            raise ValueError(f"invalid video options: {self}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}")


def split_video_kwargs(kwargs: dict | None) -> tuple[dict, dict]:
    """mm_processor_kwargs -> (the keys that steer decoding, the rest for the processor)."""
    kwargs = dict(kwargs or {})
    video = {k: kwargs.pop(k) for k in VIDEO_SAMPLING_KEYS if k in kwargs}
    return video, kwargs


def layer_video_kwargs(*layers: dict) -> dict:
    """Sampling keys of several sources, later ones winning (server defaults, then the request's);
    a layer that names `fps` or `num_frames` replaces the earlier layers' choice of either."""
    merged: dict = {}
    for layer in layers:
        if "fps" in layer or "num_frames" in layer:
            merged.pop("fps", None)
            merged.pop("num_frames", None)
        merged.update(layer)
    return merged


def load_video(path_or_bytes: str | os.PathLike | bytes, *, fps: float | None = None,
               num_frames: int | None = None, max_frames: int | None = None,
               max_pixels: int | None = None, decode_timeout: float | None = None) -> VideoFrames:
    """Decode a video file (a path or its bytes) for `multi_modal_data["video"]`; options not given
    take the server-wide defaults (environment) described in `VideoOptions.from_env`."""
    given = {"fps": fps, "num_frames": num_frames, "max_frames": max_frames, "max_pixels": max_pixels,
             "decode_timeout": decode_timeout}
    options = replace(VideoOptions.from_env(), **{k: v for k, v in given.items() if v is not None})
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return decode_video(bytes(path_or_bytes), options)
    path = os.fspath(path_or_bytes)
    with open(path, "rb") as f:
        data = f.read()
    return decode_video(data, options, source=path)


# ---- decoding -------------------------------------------------------------------------------
@dataclass
class _FrameIndex:
    """What the demux pass learns: each frame's presentation time and keyframe group."""
    times: list[float]  # seconds from the first frame, ascending
    gops: list[int]  # the keyframe group of each frame (index into `gop_key_times`)
    gop_key_times: list[float]  # the time of each group's keyframe
    duration: float  # from the first frame to the end of the last
    first_pts: int  # the first frame's timestamp, in the stream's time base
    has_timestamps: bool  # False: times are frame counts over the nominal rate, decode everything


def decode_video(data: bytes, options: VideoOptions | None = None, source: str = "the video") -> VideoFrames:
    """Video bytes -> `VideoFrames` sampled per `options`; `MediaError` names what went wrong."""
    import av  # imported on the first video, not with the server

    options = options or VideoOptions.from_env()
    options.check()
    deadline = time.monotonic() + options.decode_timeout
    try:
        index = _index_frames(av, data, source, deadline, options.decode_timeout)
        picks, fps = plan_samples(index.times, index.duration, options)
        frames = _decode_picks(av, data, source, index, picks, options, deadline)
    except MediaError:
        raise
    except MemoryError as e:
        raise MediaError(f"the video from {source} is too large to decode") from e
    except Exception as e:  # FFmpeg's errors, or whatever else a malformed stream makes PyAV raise
        raise MediaError(f"cannot decode the video from {source}: {_describe(e)}") from e
    return VideoFrames(frames=frames, fps=fps)


def _describe(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {msg}"


def _open(av, data: bytes, source: str):
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore",
                            options={"format_whitelist": ",".join(ALLOWED_DEMUXERS)})
    except Exception as e:
        raise MediaError(f"cannot read the video from {source}: not a video file FFmpeg can open "
                         f"as {'/'.join(ALLOWED_DEMUXERS[:4])}/... ({_describe(e)})") from e
    if not container.streams.video:
        container.close()
        raise MediaError(f"the file from {source} has no video stream")
    return container


def _check_deadline(deadline: float, timeout: float, source: str) -> None:
    if time.monotonic() > deadline:
        raise MediaError(f"decoding the video from {source} took longer than {timeout:g} s")


def _index_frames(av, data: bytes, source: str, deadline: float, timeout: float) -> _FrameIndex:
    with _open(av, data, source) as container:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > MAX_SOURCE_PIXELS:
            raise MediaError(f"the video from {source} is {w}x{h}, more than the {MAX_SOURCE_PIXELS} "
                             "pixels per frame this server decodes")
        pts, gop_of = array("q"), array("l")
        key_pts: list[int | None] = []
        missing_pts = False
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if len(pts) % 256 == 0:
                _check_deadline(deadline, timeout, source)
                if len(pts) >= MAX_SOURCE_FRAMES:
                    raise MediaError(f"the video from {source} has more than {MAX_SOURCE_FRAMES} frames")
            if packet.is_keyframe or not key_pts:
                key_pts.append(packet.pts)
            missing_pts |= packet.pts is None
            pts.append(packet.pts if packet.pts is not None else 0)
            gop_of.append(len(key_pts) - 1)
        if not pts:
            raise MediaError(f"the video from {source} has no frames")
        # The codec's own rate first: for raw streams the demuxer's average is a made-up 25.
        rate = stream.codec_context.framerate or stream.guessed_rate or stream.average_rate
        nominal_step = 1.0 / float(rate) if rate else None
        time_base = float(stream.time_base) if stream.time_base else None
    if missing_pts or time_base is None:
        # No timestamps (raw streams): frame i shows at i / nominal rate; every frame is decoded.
        step = nominal_step or 1 / 25
        times = [i * step for i in range(len(pts))]
        return _FrameIndex(times, [0] * len(times), [0.0], len(times) * step, 0, has_timestamps=False)
    order = sorted(range(len(pts)), key=pts.__getitem__)  # decode order -> presentation order
    first = pts[order[0]]
    times = [(pts[i] - first) * time_base for i in order]
    gops = [gop_of[i] for i in order]
    key_times = [(p - first) * time_base for p in key_pts]
    steps = np.diff(times)
    step = float(np.median(steps)) if len(steps) else (nominal_step or 1.0)
    return _FrameIndex(times, gops, key_times, times[-1] + max(step, 1e-6), first, has_timestamps=True)


def plan_samples(times: list[float], duration: float, options: VideoOptions) -> tuple[list[int], float]:
    """Frames to keep (indices into `times`) and their rate. Samples fall every `1/fps` seconds from
    the first frame (or `num_frames` evenly over the duration); each takes the frame on screen at
    that instant. Past the frame budget (or the frames there are) they spread evenly instead, and
    the rate recorded is the rate of the samples actually taken."""
    cap = min(options.max_frames, len(times))
    if options.num_frames is not None:
        n = min(options.num_frames, cap)
        step = duration / n
    else:
        n = max(1, math.ceil(duration * options.fps - 1e-6))
        step = 1.0 / options.fps
        if n > cap:
            n, step = cap, duration / cap
    eps = 1e-6
    picks = [max(0, bisect_right(times, i * step + eps) - 1) for i in range(n)]
    return picks, 1.0 / step


def _output_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _decode_picks(av, data: bytes, source: str, index: _FrameIndex, picks: list[int],
                  options: VideoOptions, deadline: float) -> np.ndarray:
    wanted = sorted(set(picks))
    needed_gops: set[int] | None = None  # None: decode every group
    if index.has_timestamps:
        needed_gops = set()
        for i in wanted:
            g = index.gops[i]
            needed_gops.add(g)
            if g > 0 and index.times[i] < index.gop_key_times[g]:
                needed_gops.add(g - 1)  # an open-GOP leading frame refers to the group before
    with _open(av, data, source) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        matcher = _FrameMatcher([index.times[i] for i in wanted], options.max_pixels,
                                _frame_clock(index, stream))
        gop, decoding = -1, False
        for n, packet in enumerate(container.demux(stream)):
            if packet.size == 0:
                continue
            if n % 64 == 0:
                _check_deadline(deadline, options.decode_timeout, source)
            if packet.is_keyframe or gop < 0:
                gop += 1
            if needed_gops is not None and gop not in needed_gops:
                if decoding:  # drain the group decoded so far; decoding restarts at a later keyframe
                    matcher.take_all(codec.decode(None))
                    codec.flush_buffers()
                    decoding = False
                continue
            decoding = True
            matcher.take_all(codec.decode(packet))
            if matcher.done:
                break
        if decoding and not matcher.done:
            matcher.take_all(codec.decode(None))
        frames = matcher.finish()
    if frames is None:
        raise MediaError(f"no frame of the video from {source} could be decoded")
    by_index = dict(zip(wanted, frames))
    return np.stack([by_index[i] for i in picks])


def _frame_clock(index: _FrameIndex, stream):
    """decoded frame -> its time on the index's clock (seconds from the first frame)."""
    if index.has_timestamps:
        first, time_base = index.first_pts, float(stream.time_base)
        return lambda frame, count: (frame.pts - first) * time_base if frame.pts is not None else None
    # Without timestamps every frame is decoded, and the k-th one is the index's frame k.
    return lambda frame, count: index.times[count] if count < len(index.times) else None


class _FrameMatcher:
    """Takes decoded frames in presentation order and keeps, for each wanted time, the frame on
    screen then, converted to RGB at the output size; other frames are never converted."""

    def __init__(self, wanted_times: list[float], max_pixels: int, clock):
        self.wanted = wanted_times
        self.max_pixels = max_pixels
        self.clock = clock
        self.out: list[np.ndarray] = []
        self.size: tuple[int, int] | None = None
        self.prev = None  # the last frame taken
        self.count = 0

    @property
    def done(self) -> bool:
        return len(self.out) == len(self.wanted)

    def _rgb(self, frame) -> np.ndarray:
        if self.size is None:  # every frame is scaled to one size, that of the first kept
            self.size = _output_size(frame.width, frame.height, self.max_pixels)
        w, h = self.size
        return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")

    def take(self, frame) -> None:
        t = self.clock(frame, self.count)
        self.count += 1
        if t is None or self.done:
            return
        eps = 1e-6
        while not self.done and t > self.wanted[len(self.out)] + eps:
            # A later frame came first: the one before it was on screen at the wanted time.
            self.out.append(self._rgb(self.prev if self.prev is not None else frame))
        if not self.done and t >= self.wanted[len(self.out)] - eps:
            self.out.append(self._rgb(frame))
        self.prev = frame

    def take_all(self, frames) -> None:
        for frame in frames:
            self.take(frame)

    def finish(self) -> list[np.ndarray] | None:
        """Wanted times after the last decoded frame get that frame."""
        if self.prev is None:
            return None
        while not self.done:
            self.out.append(self._rgb(self.prev))
        return self.out
