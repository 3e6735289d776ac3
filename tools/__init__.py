"""Builders of what the tests and the examples use offline: the real Qwen tokenizers, SmolLM2-135M."""
