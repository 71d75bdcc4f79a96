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
from kvpolicy.store.positions import Move, Positions
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
    and blocks, what decides their bookkeeping (then a cache gives them one
    :class:`~kvpolicy.store.positions.Positions`, and a fused executor reads a token's key and
    value at the same index)."""
    return keys.positions.key == values.positions.key


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
    """Keys or values of one layer under one selector and one demotion rule: the tensors of
    each region, placed where its :class:`~kvpolicy.store.positions.Positions` says (an object
    that the stores of one schedule share, see :func:`~kvpolicy.store.positions.share_positions`)."""

    def __init__(
        self,
        selector: Selector,
        demote: str,
        spec: QuantSpec,
        backend: QuantizerBackend | None,
        block: int | None = None,
    ):
        self.spec = spec
        self.backend = backend
        block = block or (spec.group_size if spec.axis == "channel" else 1)
        packs_channels = demote == "quantize" and selector.budget is not None and spec.axis == "channel"
        if packs_channels and block % spec.group_size:
            raise ValueError(f"block={block} must be a multiple of the per-channel group_size={spec.group_size}")
        self.positions = Positions(selector, demote, block)
        self.reset()

    def reset(self) -> None:
        self.positions.reset()
        #: tokens this store holds and ``*_pos`` their positions (the shared bookkeeping may be a step ahead)
        self.catch_up()
        self.fp: torch.Tensor | None = None
        self.staging: torch.Tensor | None = None
        self.packed: Packed | None = None

    # the bookkeeping, read through: the positions of what this store holds
    @property
    def selector(self) -> Selector:
        return self.positions.selector

    @property
    def unbound_selector(self) -> Selector:
        return self.positions.unbound_selector

    @property
    def demote(self) -> str:
        return self.positions.demote

    @property
    def block(self) -> int:
        return self.positions.block

    def catch_up(self) -> None:
        """Take the positions of what this store holds from its bookkeeping: after each step
        this store applies (another store of the schedule may book the next step before this
        store's view of the current one is read), and when the CUDA-graph ring hands tokens back."""
        positions = self.positions
        self.length = positions.length
        self.fp_pos, self.staging_pos, self.packed_pos = positions.fp_pos, positions.staging_pos, positions.packed_pos

    @property
    def evicted(self) -> int:
        return self.positions.evicted

    @property
    def demoted(self) -> bool:
        """Whether any token has left the full-precision region (staged, packed or evicted)."""
        return self.positions.demoted

    def view(self) -> TensorView:
        return TensorView(self.fp, self.fp_pos, self.staging, self.staging_pos, self.packed, self.packed_pos)

    def _move(self, q: int) -> Move:
        """This step's move: booked now, or already by another store of the schedule."""
        move = self.positions.step(self.length, q)
        self.catch_up()
        return move

    def append(self, x: torch.Tensor) -> None:
        """Add ``x`` (``[B, H, q, D]``, positions ``length .. length+q-1``) and demote what the selector drops."""
        move = self._move(x.shape[2])
        if move.run is not None:
            start, count = move.run
            fp = self.fp
            if not count:
                self.fp = torch.cat([fp, x], dim=2)
                return
            stop, held = start + count, fp.shape[2]
            kept = ([fp[:, :, :start]] if start else []) + ([fp[:, :, stop:]] if stop < held else [])
            self.fp = torch.cat([*kept, x], dim=2) if kept else owned(x)
            self._demote(fp[:, :, start:stop], move)
            return
        cand = owned(x) if self.fp is None else torch.cat([self.fp, x], dim=2)
        if not move.dropped:
            self.fp = cand
            return
        if move.oldest:  # the oldest arrivals leave (a window moving on)
            self.fp, demoted = take_run(cand, move.dropped, cand.shape[2]), cand[:, :, : move.dropped]
        else:
            self.fp, demoted = take_tokens(cand, move.keep), take_tokens(cand, move.drop)
        self._demote(demoted, move)

    def _demote(self, x: torch.Tensor, move: Move) -> None:
        """Tokens ``x`` left the full-precision region: evicted, or staged and ``move.ready`` of
        the staging buffer then ``x`` packed."""
        if move.evict:
            return
        joined = self.staging is not None  # then x becomes a new tensor of exactly these tokens
        if joined:
            x = torch.cat([self.staging, x], dim=2)
        ready = move.ready
        if ready:
            block = self.backend.quantize(x[:, :, :ready], self.spec)  # a view: backends slice it
            self.packed = block if self.packed is None else self.backend.concat([self.packed, block])
        rest = x.shape[2] - ready
        if not rest:
            self.staging = None
        elif joined and not ready:
            self.staging = x
        else:  # a copy: the rest may be a view of a long prefill that must not stay alive
            self.staging = x[:, :, ready:].clone(memory_format=torch.contiguous_format)

    def overwrite_full_precision(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the full-precision tokens at region indices ``slots`` (int64, on the device)
        with ``values`` ``[B, H, len(slots), D]``; positions are unchanged. A new tensor, so
        views taken before stay as they were."""
        fp = self.fp.clone()
        fp[:, :, slots] = values
        self.fp = fp

    def crop(self, tokens: int) -> None:
        """Forget the newest ``tokens`` tokens; only while nothing was ever demoted."""
        if self.positions.demoted:
            raise RuntimeError("a store that has demoted tokens cannot be cropped")
        self.positions.crop_to(self.length - tokens)  # once for the stores that share it: a no-op after
        self.catch_up()
        held = len(self.fp_pos)
        self.fp = None if self.fp is None or not held else self.fp[:, :, :held]

    def rotations(self) -> list[torch.Tensor]:
        """The rotation matrix its packed region records, if any (one per device, shared
        between stores: counted once per cache by
        :meth:`~kvpolicy.cache.policy_cache.KVPolicyCache.memory`)."""
        rotation = getattr(self.packed, "rotation", None)
        return [] if rotation is None else [rotation]

    def nbytes(self) -> dict[str, int]:
        """True bytes held by this store's tensors, by region (its positions, shared between the
        stores of a schedule, are counted once per cache by
        :meth:`~kvpolicy.cache.policy_cache.KVPolicyCache.memory`)."""
        packed = self.packed.nbytes() if self.packed is not None else {"codes": 0, "scales": 0}
        return {
            "full_precision": _tensor_bytes(self.fp),
            "staging": _tensor_bytes(self.staging),
            "codes": packed["codes"],
            "scales": packed["scales"],
        }

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every batch-leading tensor (beam reorder, batch selection)."""
        self.fp = None if self.fp is None else fn(self.fp)
        self.staging = None if self.staging is None else fn(self.staging)
        self.packed = None if self.packed is None else self.packed.map_batch(fn)

    def concat_batch(self, others: list[TensorStore]) -> None:
        """Take the rows of ``others`` after this store's own: stores of the same policy that
        hold the same positions (prompts of one length prefilled in groups of rows). The rows
        move: ``others`` hold no tensors afterwards."""
        mine = (self.length, self.fp_pos, self.staging_pos, self.packed_pos)
        for other in others:
            theirs = (other.length, other.fp_pos, other.staging_pos, other.packed_pos)
            if mine[0] != theirs[0] or not all(torch.equal(a, b) for a, b in zip(mine[1:], theirs[1:], strict=True)):
                raise ValueError(
                    f"concat_batch joins stores holding the same positions; one holds {mine[0]} tokens, "
                    f"another {theirs[0]} (or the same count in other regions)"
                )
        for region in ("fp", "staging"):
            if getattr(self, region) is not None:
                setattr(self, region, torch.cat([getattr(self, region)] + [getattr(o, region) for o in others]))
        if self.packed is not None:
            self.packed = self.packed.concat_batch([o.packed for o in others])
        for other in others:
            other.fp = other.staging = other.packed = None
