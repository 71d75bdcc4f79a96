"""Per-layer token stores: a full-precision region, a staging buffer and a packed region.

A :class:`TensorStore` holds one of keys or values for one layer. Tokens enter the
full-precision region; when the selector stops keeping a position, that token is demoted
exactly once, from its original values: it is evicted, or it waits in the staging buffer
until a quantization block is complete (``group_size`` tokens for per-channel groups,
one token for per-token groups) and is then packed. Packed tokens never come back.

Regions are stored in arrival order, not position order; each region carries the int32
positions of its tokens (kept on the host: selection is bookkeeping and never makes the
device wait), so attention can mask padding and pair keys with values.

Demotions are packed ``block`` tokens at a time (a multiple of the per-channel group size).
A policy gives its key and value stores the same block, so when both use the same
selector their packed regions hold the same positions in the same order, which lets a
fused executor read keys and values of a token at the same index.
Tensors are replaced, never written in place, so a :class:`TensorView` taken before an
update stays valid after it.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from kvpolicy.config import QuantSpec
from kvpolicy.quantizers import Packed, QuantizerBackend
from kvpolicy.selectors import Selector
from kvpolicy.transfer import to_device


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, :, index]`` for a CPU ``index``, without making the host wait for the device.

    A contiguous run (the common case: a window moving by one) is copied as a slice (a copy,
    so the result does not keep the larger ``x`` alive); otherwise
    the index goes to the device from pinned memory, asynchronously (a copy from pageable
    memory would first wait for every queued kernel).
    """
    n = len(index)
    if n and int(index[-1]) - int(index[0]) + 1 == n:
        return x[:, :, int(index[0]) : int(index[0]) + n].clone()
    return x.index_select(2, to_device(index, x.device))


def owned(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it when it is a view into a larger buffer (a fused QKV projection's
    output, as GPT-2 and Phi-3 produce): a stored view would keep the whole buffer alive."""
    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return x.clone(memory_format=torch.contiguous_format)
    return x


def take_run(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``x[:, :, start:stop]``: a view when it is most of ``x`` (keeping ``x`` alive costs
    little), else a copy (so a short run does not hold a long prefill in memory)."""
    run = x[:, :, start:stop]
    return run if 2 * (stop - start) >= x.shape[2] else run.clone()


def aligned(keys: TensorStore, values: TensorStore) -> bool:
    """Whether two stores keep identical positions in each region: equal selectors, demotion
    and blocks (then a fused executor reads a token's key and value at the same index)."""
    return keys.selector == values.selector and keys.demote == values.demote and keys.block == values.block


@attrs.frozen
class TensorView:
    """An immutable snapshot of a store: what attention reads.

    ``fp``/``staging``: ``[B, H, n, D]``; ``packed``: backend object of ``n_q`` tokens;
    each ``*_pos`` is an int32 CPU tensor ``[n]`` with the original sequence positions.
    """

    fp: torch.Tensor | None
    fp_pos: torch.Tensor
    staging: torch.Tensor | None
    staging_pos: torch.Tensor
    packed: Packed | None
    packed_pos: torch.Tensor

    def __len__(self) -> int:
        return len(self.fp_pos) + len(self.staging_pos) + len(self.packed_pos)

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Dequantize everything: ``([B, H, n, D] in region order, positions [n])``."""
        parts = [t for t in (self.fp, self.staging) if t is not None]
        if self.packed is not None:
            parts.append(self.packed.dequantize())
        positions = torch.cat([self.fp_pos, self.staging_pos, self.packed_pos])
        if not parts:
            return None, positions
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)), positions


class TensorStore:
    """Keys or values of one layer under one selector and one demotion rule."""

    def __init__(
        self,
        selector: Selector,
        demote: str,
        spec: QuantSpec,
        backend: QuantizerBackend | None,
        block: int | None = None,
    ):
        self.selector = selector
        #: the selector as configured; each sequence binds it to its prefill (see ``Selector.for_prefill``)
        self.unbound_selector = selector
        self.demote = demote
        self.spec = spec
        self.backend = backend
        self.block = block or (spec.group_size if spec.axis == "channel" else 1)
        packs_channels = demote == "quantize" and selector.budget is not None and spec.axis == "channel"
        if packs_channels and self.block % spec.group_size:
            raise ValueError(f"block={self.block} must be a multiple of the per-channel group_size={spec.group_size}")
        self.reset()

    def reset(self) -> None:
        self.selector = self.unbound_selector
        self.length = 0
        self.fp: torch.Tensor | None = None
        self.staging: torch.Tensor | None = None
        self.packed: Packed | None = None
        self.fp_pos = self.staging_pos = self.packed_pos = torch.empty(0, dtype=torch.int32)
        self.evicted = 0

    @property
    def demoted(self) -> bool:
        """Whether any token has left the full-precision region (staged, packed or evicted)."""
        return self.staging is not None or self.packed is not None or self.evicted > 0

    def view(self) -> TensorView:
        return TensorView(self.fp, self.fp_pos, self.staging, self.staging_pos, self.packed, self.packed_pos)

    def append(self, x: torch.Tensor) -> None:
        """Add ``x`` (``[B, H, q, D]``, positions ``length .. length+q-1``) and demote what the selector drops."""
        q = x.shape[2]
        new_pos = torch.arange(self.length, self.length + q, dtype=torch.int32)
        previous, self.length = self.length, self.length + q
        if previous == 0:
            self.selector = self.unbound_selector.for_prefill(q)
        held = len(self.fp_pos)
        run = self.selector.dropped_run(held, q) if held else None
        if run is not None and run[0] + run[1] <= held:  # only held tokens leave: one copy, no test
            self._drop_held_run(x, new_pos, *run)
            return
        if self.fp is None:
            cand, cand_pos = owned(x), new_pos
        else:
            cand, cand_pos = torch.cat([self.fp, x], dim=2), torch.cat([self.fp_pos, new_pos])
        dropped = self.selector.oldest_dropped(len(cand_pos) - q, q)
        oldest = dropped is not None
        if dropped is None:
            dropped = 0
            if self.selector.may_demote(previous, self.length):
                kept = self.selector.is_kept(cand_pos, self.length)
                idx_drop = kept.logical_not().nonzero().squeeze(-1)
                dropped = len(idx_drop)
                oldest = dropped and int(idx_drop[-1]) == dropped - 1
        if not dropped:
            self.fp, self.fp_pos = cand, cand_pos
            return
        if oldest:  # the oldest arrivals leave (a window moving on)
            self.fp_pos, demoted_pos = cand_pos[dropped:], cand_pos[:dropped]
            self.fp, demoted = take_run(cand, dropped, cand.shape[2]), cand[:, :, :dropped]
        else:
            idx_keep = kept.nonzero().squeeze(-1)
            self.fp_pos, demoted_pos = cand_pos[idx_keep], cand_pos[idx_drop]
            self.fp = take_tokens(cand, idx_keep)
            demoted = take_tokens(cand, idx_drop)
        self._demote(demoted, demoted_pos)

    def _drop_held_run(self, x: torch.Tensor, new_pos: torch.Tensor, start: int, count: int) -> None:
        """Append ``x`` while the held tokens ``start .. start+count-1`` (region indices) leave:
        the new full-precision region is one concatenation of what stays."""
        fp, pos = self.fp, self.fp_pos
        if not count:
            self.fp, self.fp_pos = torch.cat([fp, x], dim=2), torch.cat([pos, new_pos])
            return
        stop, held = start + count, len(pos)
        kept = ([fp[:, :, :start]] if start else []) + ([fp[:, :, stop:]] if stop < held else [])
        self.fp = torch.cat([*kept, x], dim=2) if kept else owned(x)
        kept_pos = ([pos[:start]] if start else []) + ([pos[stop:]] if stop < held else [])
        self.fp_pos = torch.cat([*kept_pos, new_pos])
        self._demote(fp[:, :, start:stop], pos[start:stop])

    def _demote(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        """Tokens ``x`` (positions ``pos``) left the full-precision region: evict or stage them."""
        if self.demote == "evict":
            self.evicted += len(pos)
            return
        self._stage(x, pos)

    def _stage(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        joined = self.staging is not None  # then x becomes a new tensor of exactly these tokens
        if joined:
            x, pos = torch.cat([self.staging, x], dim=2), torch.cat([self.staging_pos, pos])
        ready = (len(pos) // self.block) * self.block
        if ready:
            block = self.backend.quantize(x[:, :, :ready], self.spec)  # a view: backends slice it
            self.packed = block if self.packed is None else self.backend.concat([self.packed, block])
            self.packed_pos = torch.cat([self.packed_pos, pos[:ready]])
        rest = len(pos) - ready
        if not rest:
            self.staging = None
        elif joined and not ready:
            self.staging = x
        else:  # a copy: the rest may be a view of a long prefill that must not stay alive
            self.staging = x[:, :, ready:].clone(memory_format=torch.contiguous_format)
        self.staging_pos = pos[ready:]

    def overwrite_full_precision(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the full-precision tokens at region indices ``slots`` (int64, on the device)
        with ``values`` ``[B, H, len(slots), D]``; positions are unchanged. A new tensor, so
        views taken before stay as they were."""
        fp = self.fp.clone()
        fp[:, :, slots] = values
        self.fp = fp

    def crop(self, tokens: int) -> None:
        """Forget the newest ``tokens`` tokens; only while nothing was ever demoted."""
        if self.packed is not None or self.staging is not None or self.evicted:
            raise RuntimeError("a store that has demoted tokens cannot be cropped")
        self.length = max(0, self.length - tokens)
        keep = self.fp_pos < self.length
        self.fp_pos = self.fp_pos[keep]
        self.fp = None if self.fp is None or not len(self.fp_pos) else self.fp[:, :, : len(self.fp_pos)]

    def rotations(self) -> list[torch.Tensor]:
        """The rotation matrices this store's backend keeps (shared between stores: counted once
        per cache by :meth:`~kvpolicy.cache.policy_cache.KVPolicyCache.memory`)."""
        matrices = getattr(self.backend, "matrices", None)
        return matrices() if matrices is not None else []

    def nbytes(self) -> dict[str, int]:
        """True bytes held by this store's tensors, by region."""
        packed = self.packed.nbytes() if self.packed is not None else {"codes": 0, "scales": 0}
        return {
            "full_precision": _tensor_bytes(self.fp),
            "staging": _tensor_bytes(self.staging),
            "codes": packed["codes"],
            "scales": packed["scales"],
            "positions": sum(_tensor_bytes(p) for p in (self.fp_pos, self.staging_pos, self.packed_pos)),
        }

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every batch-leading tensor (beam reorder, batch selection)."""
        self.fp = None if self.fp is None else fn(self.fp)
        self.staging = None if self.staging is None else fn(self.staging)
        self.packed = None if self.packed is None else self.packed.map_batch(fn)
