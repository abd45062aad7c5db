"""Pallas attention kernels: `gpu/` (Triton / Mosaic GPU) and `tpu/` (Mosaic TPU, splash).

Each subpackage registers an attention backend with `duojax.attention.dispatch`
when imported; nothing here imports them eagerly.
"""
