"""Loading images (and video) named by URL: `data:` URLs, `file://` URLs inside an allowed
directory, and http(s) URLs fetched with a timeout and a size cap, refusing addresses inside the
host's networks (loopback, private, link-local, multicast) unless the host is explicitly allowed."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from urllib.parse import unquote, urljoin, urlparse

import httpx
from PIL import Image

MAX_REDIRECTS = 5


class MediaError(ValueError):
    """A media URL that cannot be loaded; its message is safe to show the client."""


def image_fetch_timeout() -> float:
    return float(os.environ.get("VLMSERVE_IMAGE_FETCH_TIMEOUT", "5"))


def video_fetch_timeout() -> float:
    return float(os.environ.get("VLMSERVE_VIDEO_FETCH_TIMEOUT", "30"))


def max_media_bytes() -> int:
    return int(os.environ.get("VLMSERVE_MAX_MEDIA_BYTES", str(32 << 20)))


def max_video_bytes() -> int:
    # Videos run larger than images: a minute of 720p H.264 is some 10-40 MB.
    return int(os.environ.get("VLMSERVE_MAX_VIDEO_BYTES", str(128 << 20)))


def decode_image(data: bytes, source: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise MediaError(f"cannot decode the image from {source}: {type(e).__name__}: {e}") from e
    return img


class MediaConnector:
    def __init__(self, allowed_local_media_path: str | None = None,
                 allowed_media_domains: list[str] | None = None):
        self.allowed_root = os.path.realpath(allowed_local_media_path) if allowed_local_media_path else None
        self.allowed_domains = {d.lower() for d in (allowed_media_domains or [])}

    async def load_bytes(self, url: str, timeout: float, limit: int | None = None) -> bytes:
        if not isinstance(url, str) or not url:
            raise MediaError("the media URL is empty")
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            return self._data_url(url, limit)
        if scheme == "file":
            return await asyncio.to_thread(self._file_url, url, limit)
        if scheme in ("http", "https"):
            return await self._fetch(url, timeout, limit)
        raise MediaError(f"unsupported media URL scheme {scheme!r}: use http(s), data or file URLs")

    async def load_image(self, url: str) -> Image.Image:
        data = await self.load_bytes(url, image_fetch_timeout())
        return await asyncio.to_thread(decode_image, data, _short(url))

    async def load_video(self, url: str, **sampling):
        """-> `VideoFrames`; `sampling`: per-request fps / num_frames / max_frames over the
        server-wide defaults (see `vlmserve.multimodal.video.VideoOptions`)."""
        from vlmserve.multimodal.video import VideoOptions, decode_video  # PyAV only once a video comes

        options = VideoOptions.from_env().with_request(sampling)
        data = await self.load_bytes(url, video_fetch_timeout(), max_video_bytes())
        return await asyncio.to_thread(decode_video, data, options, _short(url))

    # ---- data: ---------------------------------------------------------------------------
    @staticmethod
    def _data_url(url: str, limit: int | None = None) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise MediaError("malformed data URL: no ',' before the data")
        if not header.endswith(";base64"):
            raise MediaError("data URLs must be base64-encoded (data:<type>;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"malformed base64 in data URL: {e}") from e
        limit = limit or max_media_bytes()
        if len(data) > limit:
            raise MediaError(f"the media is larger than {limit} bytes")
        return data

    # ---- file: ---------------------------------------------------------------------------
    def _file_url(self, url: str, limit: int | None = None) -> bytes:
        if self.allowed_root is None:
            raise MediaError("file URLs are not allowed: start the server with --allowed-local-media-path")
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError("file URLs must name a local path (file:///path)")
        path = os.path.realpath(unquote(parsed.path))  # resolves '..' and symlinks
        if os.path.commonpath([path, self.allowed_root]) != self.allowed_root:
            raise MediaError("the file is outside --allowed-local-media-path")
        if not os.path.isfile(path):
            raise MediaError(f"no such file: {unquote(parsed.path)}")
        limit = limit or max_media_bytes()
        if os.path.getsize(path) > limit:
            raise MediaError(f"the media is larger than {limit} bytes")
        with open(path, "rb") as f:
            return f.read()

    # ---- http(s): -------------------------------------------------------------------------
    async def _check_host(self, url: str) -> None:
        host = (urlparse(url).hostname or "").lower()
        if not host:
            raise MediaError(f"the media URL has no host: {_short(url)}")
        if host in self.allowed_domains:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise MediaError(f"cannot resolve the media host {host!r}") from e
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            if (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                    or addr.is_reserved or addr.is_unspecified):
                raise MediaError(f"the media host {host!r} resolves to a non-public address; "
                                 "name it in --allowed-media-domains to allow it")

    async def _fetch(self, url: str, timeout: float, limit: int | None = None) -> bytes:
        limit = limit or max_media_bytes()
        try:
            async with asyncio.timeout(timeout):
                async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
                    for _ in range(MAX_REDIRECTS + 1):
                        await self._check_host(url)
                        async with client.stream("GET", url) as resp:
                            if resp.is_redirect:
                                url = urljoin(url, resp.headers.get("location", ""))
                                continue
                            if resp.status_code != 200:
                                raise MediaError(f"fetching {_short(url)} gave HTTP {resp.status_code}")
                            chunks, size = [], 0
                            async for chunk in resp.aiter_bytes():
                                size += len(chunk)
                                if size > limit:
                                    raise MediaError(f"the media at {_short(url)} is larger than {limit} bytes")
                                chunks.append(chunk)
                            return b"".join(chunks)
                    raise MediaError(f"too many redirects fetching {_short(url)}")
        except TimeoutError as e:
            raise MediaError(f"fetching {_short(url)} took longer than {timeout:g} s") from e
        except httpx.HTTPError as e:
            raise MediaError(f"cannot fetch {_short(url)}: {type(e).__name__}") from e


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:60] + "..."
