"""What the HTTP handlers share: the engine, the tokenizer, names, templates, media loading."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from vlmserve.engine.async_engine import AsyncLLMEngine
from vlmserve.entrypoints.openai.metrics import ServerMetrics
from vlmserve.multimodal.media import MediaConnector


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, message: str, status: int = 400, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    served_model_names: list[str]
    chat_template: str | None
    content_format: str  # "string" | "openai"
    media: MediaConnector
    metrics: ServerMetrics
    api_key: str | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.model_config.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")

    def max_tokens_for(self, prompt_len: int, requested: int | None) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            return max(room, 1)
        if requested > room:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {prompt_len + requested} tokens ({prompt_len} in the input, "
                           f"{requested} in the completion). Please reduce the length of the input or the "
                           "completion.", param="max_tokens")
        return requested


async def watch_disconnect(raw: Request, task: asyncio.Task) -> None:
    """Cancel `task` (which aborts its request) once the client is gone."""
    while not task.done():
        if await raw.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.2)
