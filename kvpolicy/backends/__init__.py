"""Quantizer backends: ``native`` (pure torch, :mod:`kvpolicy.backends.native`) and the
wrappers of third-party libraries (optimum-quanto, HQQ).

The library wrappers keep that library's own packed tensors; nothing is fake-quantized.
Their shared container is :class:`~kvpolicy.backends.row_packed.RowPacked`.
"""
