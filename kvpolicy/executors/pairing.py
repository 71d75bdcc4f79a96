"""Pairing each cached key with its value when the two stores hold tokens in different orders.

Key and value stores under different selectors (PartialLogQuant: log retention for keys, a
window for values) keep different tokens in full precision, so the same position sits in a
different region, at a different index, on each side. Attention needs the pairs. Keys are
quantized per channel in groups of tokens, so they are read in their packed order; values
are quantized per token, so any packed value row can be read on its own. The pairing
therefore keeps the packed keys as they are and says, for each, which packed value row
belongs to it (:attr:`PairedRegions.value_rows`); every other token (a side in full
precision or staging, or a packed key whose value is not packed yet) is gathered into one
small full-precision pair. With the budgets of the shipped policies that set holds a few
hundred tokens, whatever the context length.

When both stores retain alike, the regions pass through untouched (``value_rows`` is
``None``: packed key ``i`` pairs with packed value ``i``).
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from kvpolicy.quantizers import Packed
from kvpolicy.store import TensorView
from kvpolicy.transfer import to_device


@attrs.frozen
class PairedRegions:
    """The cached tokens of one step as an executor attends them.

    ``full_precision``: ``(keys, values)`` pairs ``[B, H, n_i, D]`` whose positions are
    ``full_precision_pos_parts`` (int32 host, in that order: joined on demand by
    :attr:`full_precision_pos`, which a decode step without a mask never needs); ``packed_keys``/
    ``packed_values``: the packed regions (or ``None``) with ``packed_pos`` the keys'
    positions; ``pairing``: which packed value row pairs with each packed key, ``None`` when
    row ``i`` pairs with row ``i``.
    """

    full_precision: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    full_precision_pos_parts: tuple[torch.Tensor, ...]
    packed_keys: Packed | None
    packed_values: Packed | None
    packed_pos: torch.Tensor
    pairing: PackedPairing | None = None

    @property
    def full_precision_pos(self) -> torch.Tensor:
        """int32 host ``[Σ n_i]``: the positions of the full-precision pairs, in their order."""
        parts = self.full_precision_pos_parts
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def value_rows(self) -> torch.Tensor | None:
        """int64 host ``[N]``: the packed value row of each packed key, ``-1`` where that token
        is among the full-precision pairs instead; ``None`` when row ``i`` pairs with row ``i``."""
        return None if self.pairing is None else self.pairing.value_rows

    def value_rows_on(self, device: torch.device) -> torch.Tensor | None:
        """:attr:`value_rows` as int32 on ``device`` (what the fused kernel reads), or ``None``."""
        return None if self.pairing is None else self.pairing.rows_on(device)


@attrs.define(eq=False)
class PackedPairing:
    """Which packed value row pairs with each packed key. It depends only on the two packed
    regions, which change once per packed block, so :class:`Pairing` keeps it across steps.
    Host bookkeeping is numpy: a few hundred integers, where each torch call costs more than
    the work."""

    key_pos: torch.Tensor  # the keys' packed positions it was worked out for
    value_pos: torch.Tensor  # the values' packed positions
    value_rows: torch.Tensor  # int64 [N_k]: value row of each packed key, -1 where none
    unpaired: np.ndarray  # int64: indices of the packed keys with no packed value
    row_of_position: np.ndarray  # int64: packed value row of each position, -1 where none
    _on_device: dict = attrs.field(factory=dict)

    @classmethod
    def of(cls, keys: TensorView, values: TensorView) -> PackedPairing:
        key_pos, value_pos = keys.packed_pos.numpy(), values.packed_pos.numpy()
        newest = max(int(key_pos.max(initial=-1)), int(value_pos.max(initial=-1)))
        row_of_position = np.full(newest + 1, -1, dtype=np.int64)
        row_of_position[value_pos] = np.arange(len(value_pos))
        value_rows = row_of_position[key_pos]
        unpaired = np.flatnonzero(value_rows < 0)
        return cls(keys.packed_pos, values.packed_pos, torch.from_numpy(value_rows), unpaired, row_of_position)

    def serves(self, keys: TensorView, values: TensorView) -> bool:
        # regions are replaced, never changed in place: the same position tensors, the same regions
        return keys.packed_pos is self.key_pos and values.packed_pos is self.value_pos

    def nbytes(self) -> int:
        """Bytes of its own indices (the position tensors are the stores')."""
        arrays = (self.unpaired, self.row_of_position)
        tensors = (self.value_rows, *self._on_device.values())
        return sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors)

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`value_rows` as int32 on ``device`` (what the fused kernel reads), sent once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = to_device(self.value_rows.to(torch.int32), device)
        return self._on_device[key]

    def packed_rows_of(self, positions: np.ndarray) -> np.ndarray:
        """int64: the packed value row of each of ``positions``, -1 where none."""
        known = len(self.row_of_position)
        if not known:
            return np.full(len(positions), -1, dtype=np.int64)
        return np.where(positions < known, self.row_of_position[np.minimum(positions, known - 1)], -1)


class Pairing:
    """Pairs one layer's key and value stores, step after step (see the module docstring).

    Remembers the last :class:`PackedPairing` and the last packed tokens it dequantized on
    each side, so a step in which no block was packed only locates the few unpacked tokens.
    Holds nothing but these memos.
    """

    def __init__(self) -> None:
        self._packed: PackedPairing | None = None
        self._key_rows, self._value_rows = DequantizedRows(), DequantizedRows()

    def nbytes(self) -> int:
        """Bytes of the memos: the dequantized packed tokens and the packed pairing's indices."""
        packed = self._packed.nbytes() if self._packed is not None else 0
        return packed + self._key_rows.nbytes() + self._value_rows.nbytes()

    def __call__(self, keys: TensorView, values: TensorView, aligned: bool) -> PairedRegions:
        """The step's regions; ``aligned`` says both stores are known to hold the same positions
        in the same order (then nothing is gathered).

        Raises ``RuntimeError`` when the two sides hold different positions (one side evicted a
        token the other kept): such a token has no partner to attend with.
        """
        if aligned and len(keys) != len(values):
            raise RuntimeError("key and value stores hold different positions; eviction must match")
        if aligned or _same_positions(keys, values):
            pairs = tuple((k, v) for k, v in ((keys.fp, values.fp), (keys.staging, values.staging)) if k is not None)
            full_pos = (keys.fp_pos, keys.staging_pos)
            return PairedRegions(pairs, full_pos, keys.packed, values.packed, keys.packed_pos)
        if len(keys) != len(values):
            raise RuntimeError("key and value stores hold different positions; eviction must match")
        if self._packed is None or not self._packed.serves(keys, values):
            self._packed = PackedPairing.of(keys, values)
        packed = self._packed
        # gathered tokens, in key order: every unpacked key, then the packed keys left unpaired
        key_unpacked, unpaired = len(keys.fp_pos) + len(keys.staging_pos), len(packed.unpaired)
        positions = np.concatenate(
            [keys.fp_pos.numpy(), keys.staging_pos.numpy(), keys.packed_pos.numpy()[packed.unpaired]]
        )
        pairs = ()
        if len(positions):
            value_slots = _value_slots(values, packed, positions)
            if unpaired:
                key_slots = np.concatenate([np.arange(key_unpacked), key_unpacked + packed.unpaired])
                gathered_keys = gather(keys, key_slots, self._key_rows)
            else:  # the unpacked keys as they are
                parts = [t for t in (keys.fp, keys.staging) if t is not None]
                gathered_keys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            pairs = ((gathered_keys, gather(values, value_slots, self._value_rows)),)
        full_pos = (torch.from_numpy(positions),)
        if unpaired == len(packed.value_rows):  # no packed key has a packed value
            return PairedRegions(pairs, full_pos, None, None, keys.packed_pos[:0])
        return PairedRegions(pairs, full_pos, keys.packed, values.packed, keys.packed_pos, packed)


def pair_regions(keys: TensorView, values: TensorView, aligned: bool) -> PairedRegions:
    """:class:`Pairing` for one step, with nothing remembered."""
    return Pairing()(keys, values, aligned)


def _value_slots(values: TensorView, packed: PackedPairing, positions: np.ndarray) -> np.ndarray:
    """int64: each of ``positions``' index in ``values``' regions (full precision, staging,
    packed); the unpacked values are found by a sorted search."""
    unpacked = np.concatenate([values.fp_pos.numpy(), values.staging_pos.numpy()])
    slots = len(unpacked) + packed.packed_rows_of(positions)
    found = np.zeros(len(positions), dtype=bool)
    if len(unpacked):
        order = np.argsort(unpacked, kind="stable")
        at = np.minimum(np.searchsorted(unpacked[order], positions), len(unpacked) - 1)
        found = unpacked[order[at]] == positions
        slots = np.where(found, order[at], slots)
    if not (found | (slots >= len(unpacked))).all():
        raise RuntimeError("key and value stores hold different positions; eviction must match")
    return slots


class DequantizedRows:
    """:meth:`~kvpolicy.quantizers.Packed.dequantize_tokens` remembering its last answer: the
    packed tokens a step gathers stay the same until a block is packed or a flush moves them."""

    def __init__(self) -> None:
        self._last: tuple[Packed, np.ndarray, torch.Tensor] | None = None

    def nbytes(self) -> int:
        if self._last is None:
            return 0
        rows, tokens = self._last[1], self._last[2]
        return rows.nbytes + tokens.numel() * tokens.element_size()

    def __call__(self, packed: Packed, rows: np.ndarray) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] is packed and np.array_equal(last[1], rows):
            return last[2]
        tokens = packed.dequantize_tokens(torch.from_numpy(rows))
        self._last = (packed, rows, tokens)
        return tokens


def gather(view: TensorView, slots, dequantize: DequantizedRows | None = None) -> torch.Tensor:
    """Full-precision tokens ``[B, H, len(slots), D]`` of ``view`` at ``slots`` (int64 host
    indices, numpy or torch, into its regions in the order full precision, staging, packed);
    packed tokens are dequantized one by one (through ``dequantize`` when given, else afresh).

    Slots come in runs (a window's tokens are consecutive on both sides), so the result is
    the runs' slices joined by one concatenation, or a region itself when one run covers it;
    only scattered slots are gathered by index.
    """
    slots = np.asarray(slots, dtype=np.int64)
    unpacked = len(view.fp_pos) + len(view.staging_pos)
    sources = [(t, start) for t, start in ((view.fp, 0), (view.staging, len(view.fp_pos))) if t is not None]
    if len(slots) and slots.max() >= unpacked:
        in_packed = slots >= unpacked
        rows = slots[in_packed] - unpacked
        sources.append(((dequantize or DequantizedRows())(view.packed, rows), unpacked))
        slots = slots.copy()
        slots[in_packed] = unpacked + np.arange(len(rows))
    pieces = _run_slices(sources, slots)
    if pieces is not None:
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    pool = torch.cat([t for t, _ in sources], dim=2)
    return pool.index_select(2, to_device(torch.from_numpy(slots), pool.device))


#: more runs than this are gathered by index instead (one copy, whatever the pattern)
MAX_RUNS = 8


def _run_slices(sources: list[tuple[torch.Tensor, int]], slots: np.ndarray) -> list[torch.Tensor] | None:
    """Slices of ``sources`` (``(tensor, first slot)``, in slot order) that make up ``slots``
    in order, or ``None`` when that takes more than :data:`MAX_RUNS` slices."""
    edges = [0, *(np.flatnonzero(np.diff(slots) != 1) + 1).tolist(), len(slots)]
    if len(edges) > MAX_RUNS + 1:
        return None
    pieces = []
    for a, b in zip(edges, edges[1:]):
        start, stop = int(slots[a]), int(slots[a]) + b - a
        for tensor, first in sources:
            lo, hi = max(start, first), min(stop, first + tensor.shape[2])
            if lo < hi:
                pieces.append(tensor[:, :, lo - first : hi - first])
    return pieces if len(pieces) <= MAX_RUNS else None


def _same_positions(keys: TensorView, values: TensorView) -> bool:
    return all(
        torch.equal(a, b)
        for a, b in (
            (keys.fp_pos, values.fp_pos),
            (keys.staging_pos, values.staging_pos),
            (keys.packed_pos, values.packed_pos),
        )
    )
