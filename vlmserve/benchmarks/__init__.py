"""Benchmarks, run through the CLI: `vlmserve bench throughput ...`.

Peer engines (vLLM's CPU build, Hugging Face `generate`) are measured side by side with vlmserve on
the same prompts; vLLM runs in its own interpreter and is never imported by vlmserve."""
