"""vlmserve: a fast inference and serving engine for vision-language models."""
from vlmserve.entrypoints.llm import LLM
from vlmserve.outputs import CompletionOutput, Logprob, RequestOutput
from vlmserve.sampling_params import SamplingParams
from vlmserve.version import __version__

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
