"""Device code of the fused executor and its host-side launchers.

* :mod:`~kvpolicy.executors.kernels.common`: the :class:`PackedKernel` contract, the packed
  layout the kernels read (:func:`fusable`), host helpers.
* one module per packed-region kernel, each a :class:`PackedKernel` with typed launch settings:
  :mod:`~kvpolicy.executors.kernels.mma_splits` (Gluon, ``mma``) and
  :mod:`~kvpolicy.executors.kernels.triton_splits` (Triton, ``triton``); their device code in
  ``mma_device.py`` and ``triton_device.py`` (imported only where Triton is).
* :mod:`~kvpolicy.executors.kernels.decode`: the ordered list :data:`PACKED_KERNELS` and a
  whole decode step (:func:`decode_attention`).
* :mod:`~kvpolicy.executors.kernels.inspection`: compile a kernel for a GPU without one and
  read its PTX/SASS (tests and benchmarks).

Adding a kernel: a module with a :class:`PackedKernel` subclass, and its entry in
:data:`PACKED_KERNELS` at the place it should be asked.
"""

from kvpolicy.executors.kernels.common import (
    PackedKernel,
    decode_fusable,
    fusable,
    gluon_available,
    triton_available,
)
from kvpolicy.executors.kernels.decode import (
    KERNEL_NAMES,
    PACKED_KERNELS,
    choose_kernel,
    decode_attention,
    launch_settings,
    packed_decode_attention,
    packed_splits,
)
from kvpolicy.executors.kernels.mma_splits import MmaLaunch, MmaSplits
from kvpolicy.executors.kernels.triton_splits import TritonLaunch, TritonSplits

__all__ = [
    "KERNEL_NAMES",
    "PACKED_KERNELS",
    "MmaLaunch",
    "MmaSplits",
    "PackedKernel",
    "TritonLaunch",
    "TritonSplits",
    "choose_kernel",
    "decode_attention",
    "decode_fusable",
    "fusable",
    "gluon_available",
    "launch_settings",
    "packed_decode_attention",
    "packed_splits",
    "triton_available",
]
