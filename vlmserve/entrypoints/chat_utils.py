"""OpenAI-style chat messages -> a prompt through the model's chat template, plus the media the
messages reference (loaded once each), in the order their placeholders appear."""
from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field

from vlmserve.multimodal.media import MediaConnector, MediaError
from vlmserve.multimodal.video import layer_video_kwargs, split_video_kwargs

# content part type -> (modality, the field holding its URL)
_MEDIA_PARTS = {"image_url": ("image", "image_url"), "input_image": ("image", "image_url"),
                "video_url": ("video", "video_url")}

# A template that loops over a message's content handles OpenAI-style lists of parts.
_LOOPS_OVER_CONTENT = re.compile(r"\{%-?\s*for\s+\w+\s+in\s+[^%]*content")


class ChatError(ValueError):
    """A chat request that cannot be turned into a prompt; the message is for the client."""


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file path or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if any(c in value for c in "{%}"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def model_chat_template(model_dir: str, tokenizer) -> str | None:
    """The model's own template: the tokenizer's (tokenizer_config.json or chat_template.jinja, as
    transformers loads them), else the processor's chat_template.json or processor_config.json."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    for name in ("chat_template.jinja", "chat_template.json", "processor_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            if name.endswith(".jinja"):
                return f.read()
            try:
                value = json.load(f).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
        if isinstance(value, str) and value:
            return value
    return None


def detect_content_format(template: str) -> str:
    return "openai" if _LOOPS_OVER_CONTENT.search(template) else "string"


@dataclass
class ParsedChat:
    conversation: list[dict]
    media_urls: dict[str, list[str]] = field(default_factory=dict)  # modality -> URLs, prompt order


def _part_url(part: dict, kind: str) -> str:
    value = part.get(kind)
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ChatError(f"a '{kind}' content part needs a URL ({{\"{kind}\": {{\"url\": ...}}}})")
    return value


def parse_messages(messages: list[dict], content_format: str, placeholder) -> ParsedChat:
    """`placeholder(modality, index)` gives the text that marks an item in a string prompt."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    parsed = ParsedChat([])
    for mi, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ChatError(f"message {mi} needs a 'role'")
        content = msg.get("content")
        out = {k: v for k, v in msg.items() if k != "content"}
        if content is None or isinstance(content, str):
            out["content"] = content or ""
            parsed.conversation.append(out)
            continue
        if not isinstance(content, list):
            raise ChatError(f"message {mi}: 'content' must be a string or a list of parts")
        parts, texts, placeholders = [], [], []
        for pi, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise ChatError(f"message {mi} part {pi}: a content part needs a 'type'")
            kind = part["type"]
            if kind in ("text", "input_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatError(f"message {mi} part {pi}: a text part needs 'text'")
                parts.append({"type": "text", "text": text})
                texts.append(text)
            elif kind in _MEDIA_PARTS:
                modality, field_name = _MEDIA_PARTS[kind]
                urls = parsed.media_urls.setdefault(modality, [])
                urls.append(_part_url(part, field_name))
                parts.append({"type": modality})
                placeholders.append(placeholder(modality, len(urls) - 1))
            else:
                raise ChatError(f"message {mi} part {pi}: unsupported content part type {kind!r}")
        if content_format == "openai":
            out["content"] = parts
        else:  # string templates: placeholders first, then the text
            out["content"] = "".join(p + "\n" for p in placeholders) + "\n".join(texts)
        parsed.conversation.append(out)
    return parsed


def render_chat(tokenizer, conversation: list[dict], template: str | None,
                add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatError("this model has no chat template: give one with --chat-template "
                        "(offline: chat_template=...), or use the completions API")
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except Exception as e:
        raise ChatError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e


async def load_media(connector: MediaConnector, media_urls: dict[str, list[str]],
                     video_sampling: dict | None = None) -> dict[str, list]:
    """Each distinct URL is loaded once, all concurrently; videos are sampled per
    `video_sampling` (fps / num_frames / max_frames) into `VideoFrames`."""
    loaders = {"image": connector.load_image,
               "video": lambda url: connector.load_video(url, **(video_sampling or {}))}
    data = {}
    for modality, urls in media_urls.items():
        if modality not in loaders:
            raise MediaError(f"{modality} input is not supported by this server yet")
        unique = list(dict.fromkeys(urls))
        loaded = await asyncio.gather(*(loaders[modality](u) for u in unique))
        by_url = dict(zip(unique, loaded))
        data[modality] = [by_url[u] for u in urls]
    return data


def check_modality(engine, modality: str, count: int = 1) -> None:
    """Refuse media the model does not take, or more than the limit, before loading any."""
    proc = engine.mm_processor
    if proc is None or modality not in proc.modalities:
        takes = f" (it takes: {', '.join(proc.modalities)})" if proc is not None else ""
        raise ChatError(f"this model takes no {modality} input{takes}")
    limit = engine.limit_mm_per_prompt.get(modality, 1)
    if count > limit:
        raise ChatError(f"{count} {modality}s in one prompt, more than the limit of {limit} "
                        f"(raise it with --limit-mm-per-prompt {modality}={count})")


def placeholder_for(engine):
    def placeholder(modality: str, index: int) -> str:
        check_modality(engine, modality, index + 1)
        return engine.placeholder_str(modality, index)
    return placeholder


async def prepare_chat(engine, messages: list[dict], template: str | None, content_format: str,
                       connector: MediaConnector, add_generation_prompt: bool = True,
                       continue_final_message: bool = False, mm_processor_kwargs: dict | None = None):
    """Messages -> (prompt text, token ids with placeholders expanded, multimodal items); the same
    path for the server and for offline `LLM.chat`."""
    template = template or model_chat_template(engine.model_config.model, engine.tokenizer)
    if content_format == "auto":
        content_format = detect_content_format(template) if template else "string"
    parsed = parse_messages(messages, content_format, placeholder_for(engine))
    text = render_chat(engine.tokenizer, parsed.conversation, template, add_generation_prompt,
                       continue_final_message)
    for modality, urls in parsed.media_urls.items():
        check_modality(engine, modality, len(urls))
    # Sampling keys steer the video loader (server defaults in the engine's kwargs, then the
    # request's); the processor gets the rest.
    engine_video, _ = split_video_kwargs(getattr(engine.mm_processor, "mm_processor_kwargs", None))
    request_video, mm_processor_kwargs = split_video_kwargs(mm_processor_kwargs)
    media = await load_media(connector, parsed.media_urls, layer_video_kwargs(engine_video, request_video))
    ids = engine.encode_text(text, add_special_tokens=False)
    ids, items = await asyncio.to_thread(engine.process_multimodal, ids, media, mm_processor_kwargs)
    return text, ids, items
