"""Checkpoints: HF safetensors and GGUF readers, and the duojax folder (orbax)."""

from duojax.checkpoint.hf import CheckpointError

__all__ = ["CheckpointError"]
