"""The offline entry point: `LLM(model=...)`, then `generate(...)`."""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence as Seq

import torch
from tqdm.auto import tqdm

from vlmserve.config import CacheConfig, ModelConfig, SchedulerConfig, default_max_num_batched_tokens
from vlmserve.engine.llm_engine import LLMEngine
from vlmserve.entrypoints.chat_utils import load_chat_template, prepare_chat
from vlmserve.entrypoints.prompt_pipeline import PreparedPrompts, named_error, run_pipelined
from vlmserve.multimodal.media import MediaConnector
from vlmserve.outputs import RequestOutput
from vlmserve.sampling_params import SamplingParams

DEMO_MODEL_NAME = "vlmserve-demo"
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo_model")

PromptType = str | dict


def resolve_model_path(model: str | None) -> str:
    if model is None or model == DEMO_MODEL_NAME:
        return DEMO_MODEL_DIR
    return model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LLM:
    """Offline inference over a local Hugging Face model directory."""

    def __init__(self, model: str | None = None, *, task: str = "generate", tokenizer: str | None = None,
                 dtype: str | torch.dtype = "auto", seed: int = 0, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, trust_remote_code: bool = False,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, limit_mm_per_prompt: dict[str, int] | None = None,
                 mm_processor_kwargs: dict | None = None, chat_template: str | None = None,
                 allowed_local_media_path: str | None = None,
                 allowed_media_domains: list[str] | None = None, device: str | None = None,
                 load_format: str = "auto", async_scheduling: bool | None = None):
        if task != "generate":
            raise ValueError(f"task {task!r} is not supported by this version of vlmserve (only 'generate')")
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet")
        dev = torch.device(device) if device else default_device()
        model_config = ModelConfig.create(resolve_model_path(model), dtype, max_model_len, seed,
                                          trust_remote_code, dev)
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format {load_format!r}: use 'auto' or 'dummy' (random weights)")
        model_config.enforce_eager = enforce_eager
        model_config.load_format = load_format
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_max_num_batched_tokens(dev, max_num_seqs)
        scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs,
                                           max_num_batched_tokens=max_num_batched_tokens,
                                           max_model_len=model_config.max_model_len,
                                           async_scheduling=async_scheduling)
        cache_config = CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                                   gpu_memory_utilization=gpu_memory_utilization,
                                   enable_prefix_caching=enable_prefix_caching)
        tok = None
        if tokenizer is not None:
            from vlmserve.engine.llm_engine import load_tokenizer
            tok = load_tokenizer(tokenizer, trust_remote_code)
        self.enforce_eager = enforce_eager
        self.chat_template = load_chat_template(chat_template)
        self.media = MediaConnector(allowed_local_media_path, allowed_media_domains)
        self.llm_engine = LLMEngine(model_config, cache_config, scheduler_config, dev, tokenizer=tok,
                                    limit_mm_per_prompt=limit_mm_per_prompt,
                                    mm_processor_kwargs=mm_processor_kwargs)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # ---- prompts -------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        if not text:
            raise ValueError("the prompt is empty: give some text")
        return self.llm_engine.encode_text(text)

    def _prompt_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise TypeError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                text = prompt["prompt"]
                if not isinstance(text, str):
                    raise TypeError(f"'prompt' must be a string, got {type(text).__name__}")
                return text, self._tokenize(text)
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        raise TypeError(f"a prompt is a string or a dict, got {type(prompt).__name__}")

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts are tokenized here, their media processed in a thread pool; the engine steps as
        soon as the first prompts are ready. A bad prompt raises an error naming it ("prompt i: ...")
        and aborts whatever this call had queued."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        engine = self.llm_engine
        has_media = [isinstance(p, dict) and bool(p.get("multi_modal_data")) for p in prompts]
        # A lone prompt with media (a latency-bound call) is prepared in this thread, the engine's:
        # on an idle engine its encoders start before the prompt is tokenized, which then runs
        # while the device encodes.
        lone = sum(has_media) == 1
        parsed = []  # tokenized here: the tokenizer is not shared with the pool's threads
        for i, prompt in enumerate(prompts):
            mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
            mm_kwargs = prompt.get("mm_processor_kwargs") if isinstance(prompt, dict) else None
            if lone and has_media[i]:
                parsed.append((None, None, mm_data, mm_kwargs))  # tokenized in prepare()
                continue
            try:
                text, ids = self._prompt_token_ids(prompt)
            except Exception as e:
                err = named_error(e, i)
                if err is e:
                    raise
                raise err from e
            parsed.append((text, ids, mm_data, mm_kwargs))

        def prepare(i: int) -> tuple:
            # validated by add_request, whose error run_pipelined names as it would name this one's
            text, ids, mm_data, mm_kwargs = parsed[i]
            if ids is None:
                processed = engine.process_media(mm_data, mm_kwargs, for_encode_ahead=True)
                engine.encode_ahead(processed)
                text, ids = self._prompt_token_ids(prompts[i])
                return (*engine.place_media(ids, processed), text)
            ids, mm_items = engine.process_multimodal(ids, mm_data, mm_kwargs)
            return ids, mm_items, text

        prepared = PreparedPrompts(len(parsed), prepare, inline=lambda i: not parsed[i][2])
        return self._run(prepared, params, use_tqdm)

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * n if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != n:
            raise ValueError(f"{n} prompts but {len(params)} sampling params")
        return params

    def _generate_prepared(self, prompts: list[tuple], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        """prompts: (token ids, multimodal items[, prompt text]) each. Every prompt is validated
        before any is queued, so one bad prompt fails the call, not the engine."""
        params = self._params_list(sampling_params, len(prompts))
        for p in prompts:
            self.llm_engine.validate_prompt(p[0])
        ready = [(p[0], p[1], p[2] if len(p) > 2 else None) for p in prompts]
        prepared = PreparedPrompts(len(ready), lambda i: ready[i], inline=lambda i: True)
        return self._run(prepared, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_content_format: str = "auto",
             mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to OpenAI-style conversations (one, or a list of them), with the same
        message parsing, chat template and media loading as the server."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        template = load_chat_template(chat_template) or self.chat_template
        prompts = []
        for conv in conversations:
            _, ids, items = asyncio.run(prepare_chat(
                self.llm_engine, conv, template, chat_template_content_format, self.media,
                add_generation_prompt, continue_final_message, mm_processor_kwargs))
            prompts.append((ids, items))
        return self._generate_prepared(prompts, sampling_params, use_tqdm)

    def _run(self, prepared: PreparedPrompts, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        def new_id() -> str:
            return str(next(self._request_counter))

        if not use_tqdm:  # no bar to make (a latency-bound call's first token waits for it)
            return run_pipelined(self.llm_engine, prepared, params, new_id)
        bar = tqdm(total=len(params), desc="Processed prompts", dynamic_ncols=True)
        t0 = time.perf_counter()
        tokens = [0, 0]  # input, output

        def progress(out: RequestOutput) -> None:
            tokens[0] += len(out.prompt_token_ids)
            tokens[1] += sum(len(c.token_ids) for c in out.outputs)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"input: {tokens[0] / dt:.1f} toks/s, output: {tokens[1] / dt:.1f} toks/s")
            bar.update(1)

        try:
            return run_pipelined(self.llm_engine, prepared, params, new_id, progress)
        finally:
            bar.close()
