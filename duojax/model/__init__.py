"""The Llama-family decoder (pure functions over a params pytree)."""

from duojax.model.llama import (
    Params, apply_head_mask, forward_chunk, init_params, logits_from_hidden, param_shapes,
    reorder_heads, undo_head_mask)

__all__ = ["Params", "apply_head_mask", "forward_chunk", "init_params", "logits_from_hidden",
           "param_shapes", "reorder_heads", "undo_head_mask"]
