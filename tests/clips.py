"""Small real video files for tests, encoded here with PyAV: each frame a different colour pattern,
so that frames sampled at different times give the model different pixels."""
import io

import av
import numpy as np


def h264_or_mpeg4() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # a PyAV wheel without x264
        return "mpeg4"


def pattern_frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: smooth gradients shifted with i (lossy codecs keep them close to what was drawn)."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(width - 1, 1) + 37 * i) % 256
    g = (y * 255 // max(height - 1, 1) + 71 * i) % 256
    b = np.full_like(x, (29 * i) % 256)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def mp4_bytes(num_frames: int = 30, rate: int = 10, width: int = 112, height: int = 84) -> bytes:
    """An mp4 of num_frames / rate seconds."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(h264_or_mpeg4(), rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
