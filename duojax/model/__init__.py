"""The Llama-family decoder: Flax NNX modules (`modules`), used functionally through a
`ModelHandle` (`handle`), built from and to the plain params dict (`llama`)."""

from duojax.model.handle import ModelHandle, as_handle, from_params, split
from duojax.model.llama import (
    Params, apply_head_mask, forward_chunk, init_params, logits_from_hidden, param_shapes,
    reorder_heads, to_params, undo_head_mask)
from duojax.model.modules import AXES, Gate, HeadSplit, Llama
from duojax.model.pack import pack_params, unpack_params

__all__ = ["AXES", "Gate", "HeadSplit", "Llama", "ModelHandle", "Params", "apply_head_mask",
           "as_handle", "forward_chunk", "from_params", "init_params", "logits_from_hidden",
           "pack_params", "param_shapes", "reorder_heads", "split", "to_params", "undo_head_mask",
           "unpack_params"]
