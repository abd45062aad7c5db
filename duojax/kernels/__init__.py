"""Pallas attention kernels: `gpu/` (Triton / Mosaic GPU) and `tpu/` (Mosaic TPU, splash).

Each subpackage offers `backend_ops(name)`, the op table of an attention backend, which
`duojax.attention.dispatch` asks for the first time that backend is used. Importing a
subpackage queries no device and registers nothing; the kernels know nothing of the
model or the caches.
"""
