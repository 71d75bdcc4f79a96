"""Compile a Gluon or Triton kernel for a CUDA target without a GPU and read its machine code.

Triton's wheel ships ``ptxas`` and ``nvdisasm``, so a kernel can be compiled for ``sm_90`` on
any machine and its SASS inspected: registers, spills, shared memory, and the instructions
of its main loop. The tests use it to hold the Gluon kernel to its design (no shared-memory
round trip and no barrier in the loop when it reads straight into registers); the
benchmarks' notes use it to count instructions before spending device time.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Compiled:
    """One compiled kernel: resources from ``cuobjdump`` and the SASS from ``nvdisasm``."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    sass: str

    def loop_opcodes(self) -> collections.Counter:
        """Opcodes of the longest loop (a backward branch and its target), e.g. ``{"HMMA": 104}``."""
        lines = self.sass.splitlines()
        labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
        best = (0, -1)
        for i, line in enumerate(lines):
            m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], i)
        ops = re.findall(
            r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", "\n".join(lines[best[0] : best[1] + 1]), re.M
        )
        return collections.Counter(ops)


def compile_for(source, options: dict, arch: int = 90) -> Compiled:
    """Compile ``source`` (a Triton ``ASTSource`` or Gluon ``GluonASTSource``) for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout).groups()
    return Compiled(int(registers), int(stack), int(kernel.metadata.shared), sass)


def mma_kernel_source(
    key_group: int = 64, value_group: int = 64, block_n: int = 64, stages: int = 0, dtype: str = "bf16", **flags: bool
):
    """The Gluon kernel (:func:`kvpolicy.executors.kernels.mma_device.packed_decode_mma`) as launched by
    :class:`kvpolicy.executors.kernels.MmaSplits` (pointers 16-byte aligned), ready for :func:`compile_for`."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from kvpolicy.executors.kernels.mma_device import packed_decode_mma

    pointers = ["Q", "KC", "KS", "KZ", "VC", "VS", "VZ", "VROWS", "BIAS", "OUT", "LSE"]
    types = [
        f"*{dtype}",
        "*i32",
        f"*{dtype}",
        f"*{dtype}",
        "*i32",
        f"*{dtype}",
        f"*{dtype}",
        "*i32",
        "*fp32",
        "*fp32",
        "*fp32",
    ]
    signature = dict(zip(pointers, types))
    signature.update({name: "i32" for name in ("N", "NV", "HKV", "G", "tokens_per_split")}, scaling_log2="fp32")
    signature = {
        name: signature[name] for name in [*pointers, "N", "NV", "HKV", "G", "scaling_log2", "tokens_per_split"]
    }
    constants = {
        "KG": key_group, "VG": value_group, "BLOCK_N": block_n, "HAS_BIAS": flags.get("has_bias", False),
        "GATHER": flags.get("gather", False), "EXACT_KEYS": flags.get("exact_keys", False), "STAGES": stages,
    }  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers))}
    return GluonASTSource(packed_decode_mma, signature, constants, attrs)
