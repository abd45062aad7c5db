"""Haystacks, multi-passkey training samples and needle-in-a-haystack prompts.

Nothing here needs JAX; every generator is seeded and reproducible.
"""

from duojax.data.haystack import HaystackTokens, Window, load_haystack
from duojax.data.niah import (NeedleTask, build_niah_prompt, build_passkey_prompt,
                              contains_answer, depth_grid, rouge1_recall)
from duojax.data.passkey import (NATO, MultiPasskeyConfig, Sample, iter_samples,
                                 make_sample, ordinal)

__all__ = [
    "HaystackTokens", "Window", "load_haystack",
    "NeedleTask", "build_niah_prompt", "build_passkey_prompt", "contains_answer",
    "depth_grid", "rouge1_recall",
    "NATO", "MultiPasskeyConfig", "Sample", "iter_samples", "make_sample", "ordinal",
]
