"""Quantizer backends that wrap third-party libraries (optimum-quanto, HQQ).

Each keeps that library's own packed tensors; nothing is fake-quantized. The shared
container is :class:`~kvpolicy.backends.row_packed.RowPacked`.
"""
