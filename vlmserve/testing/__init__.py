"""Helpers that make small local checkpoints (random weights in real architectures, a tokenizer
trained on the spot) for tests and benchmarks; nothing is downloaded."""
