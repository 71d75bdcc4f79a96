"""Buffers allocated once, whose decode step has static shapes (for CUDA-graph decoding).

A :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer`'s stores replace their tensors at every
step, so each step's kernels see new shapes and pointers and the host must issue them one by
one. The same layer, built by ``make_cache(model, cuda_graphs=...)``, also holds
:class:`RingBuffers`: the same tokens in buffers allocated once:

* a **ring** of full-precision slots ``[B, H, slots, D]`` for the kept tokens and the staged
  ones (both are full precision, so attention treats them alike), with an additive bias
  ``[B, slots]``: 0 for a held slot, ``-inf`` for a free one;
* the **packed region** for up to ``max_cache_len`` tokens (native codes, scales and zeros),
  with a bias ``[B, capacity]`` that opens each block as it is packed.

A decode step writes the new token into the slot chosen beforehand (its index lives on the
device) and attends the whole ring and the whole packed capacity under the two biases: the
same kernels on the same buffers at every step, so the step can be captured once and
replayed (:mod:`kvpolicy.graphs.cuda_graphs`). Between steps the host books the token
(:class:`~kvpolicy.graphs.ring_schedule.RingSchedule`) on the eager stores' own bookkeeping
(:class:`~kvpolicy.store.positions.Positions`, handed over by reference), so the graph path
holds exactly the tokens, at exactly the precision, that eager decoding holds. Packing a
block quantizes its ring slots into the packed buffers (eager operations, once per block).

Multi-token steps (the prefill, a chunked prefill, a new turn) run through the layer's stores;
at the first one-token step their state is copied into the buffers (:meth:`RingBuffers.adopt`),
and the layer hands its one-token steps to the buffers while they are in use.
Served: models whose every layer is full attention, policies whose keys and values are
retained alike or paired (:class:`~kvpolicy.graphs.ring_schedule.PairedRingSchedule`), native
quantization, rotated or not (the buffers hold the rotated codes; the step rotates the query,
the ring and the output), batches without padding. Built with
``cuda_graphs=True`` anything else is refused; built by ``cuda_graphs="auto"`` (the default on
CUDA) the cache hands its tokens back to the stores instead (:meth:`RingBuffers.release`) and goes
on eagerly, so a user never meets a refusal the eager cache would not give. Without a
declared ``max_cache_len`` the packed buffers grow (doubling) as decoding fills them, and
the step is captured again.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy.cache import attention
from kvpolicy.cache.policy_cache import KVPolicyCache, KVPolicyLayer, MemoryReport
from kvpolicy.errors import ConfigError, NotSupportedError
from kvpolicy.executors import partial as pa
from kvpolicy.graphs.capability import policy_layers, serving_refusal
from kvpolicy.graphs.ring_schedule import (
    Booking,
    PairedBooking,
    PairedRingSchedule,
    RingSchedule,
    schedule_for,
)
from kvpolicy.quantizers.native import NativePacked
from kvpolicy.quantizers.rotation import rotate, rotate_back
from kvpolicy.transfer import indices_to


@attrs.frozen
class StaticStep:
    """What a layer's buffers hand its attention (``row_sinks``/``after_prefill``: never used;
    the policies they serve demote, so never ``lossless``)."""

    ring: RingBuffers
    row_sinks: None = None
    after_prefill: None = None
    lossless: bool = False


class StaticAttention:
    """Attention of a decode step on a layer's :class:`RingBuffers`: the ring and the packed
    capacity under their biases. On CUDA the fused decode kernels (two launches, fixed
    shapes); elsewhere the same sums in float32 (:mod:`kvpolicy.executors.partial`). Where a
    side is rotated (:mod:`kvpolicy.quantizers.rotation`) the step runs in the rotated space:
    the query and the ring's keys by the keys' matrix, the ring's values by the values', the
    output rotated back."""

    name = "static"

    def attend(self, module, query, step: StaticStep, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        ring = step.ring
        schedule = ring.schedule
        b, hq, q, d = query.shape
        scaling = scaling if scaling is not None else d**-0.5
        packed_keys, packed_values = ring.packed_keys, ring.packed_values
        key_rotation, value_rotation = ring.key_rotation, ring.value_rotation
        query = rotate(query, key_rotation)
        ring_keys, ring_values = rotate(ring.ring_keys, key_rotation), rotate(ring.ring_values, value_rotation)
        if query.is_cuda and ring.fused:
            from kvpolicy.executors.kernels import decode_attention

            return rotate_back(decode_attention(
                query, [(ring_keys, ring_values)], packed_keys, packed_values, scaling,
                schedule.ring_bias, schedule.packed_bias if packed_keys is not None else None,
            ), value_rotation)  # fmt: skip
        kv_heads = ring_keys.shape[1]
        grouped = pa.group_queries(query, kv_heads)
        result = pa.partial(grouped, ring_keys, ring_values, scaling, schedule.ring_bias[:, None, None, :])
        if packed_keys is not None:
            bias = schedule.packed_bias[:, None, None, :]
            stored_keys, stored_values = packed_keys.dequantize_stored(), packed_values.dequantize_stored()
            part = pa.partial(grouped, stored_keys, stored_values, scaling, bias)
            result = pa.merge([result, part])
        return rotate_back(pa.ungroup_output(result[0], hq, q).to(query.dtype), value_rotation)


STATIC_ATTENTION = StaticAttention()


def _capacity_packed(spec, backend, batch, heads, dim, capacity, dtype, device) -> NativePacked:
    """Zeroed native buffers for ``capacity`` packed tokens, in ``spec``'s layout (its rotation
    included: the buffers hold codes of rotated tokens where ``spec`` rotates)."""
    tokens = spec.group_size if spec.axis == "channel" else 1
    zeros = torch.zeros(batch, heads, tokens, dim, dtype=dtype, device=device)
    return backend.quantize(zeros, spec).allocate(capacity)


def _leading_tokens(packed: NativePacked, n: int) -> NativePacked:
    """A copy of the first ``n`` tokens of ``packed`` (a multiple of a per-channel group)."""
    return packed.slice_tokens(0, n).map_batch(torch.clone)


class RingBuffers:
    """One layer's tokens in buffers allocated once, for the replayed decode step (see the
    module docstring). A :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer` holds one (its
    ``ring``): the layer's stores serve every multi-token step and, while the buffers are not
    :attr:`in_use`, everything else. ``schedule``: the bookkeeping shared with every layer of
    the same retention schedule; ``keys``/``values``: the layer's stores, whose tokens the
    buffers take over (:meth:`adopt`) and hand back (:meth:`release`).
    """

    def __init__(self, schedule: RingSchedule, keys, values):
        self.schedule = schedule
        self.keys, self.values = keys, values
        self.in_use = False
        self.ring_keys = self.ring_values = None
        self.packed_keys = self.packed_values = None
        self.pending_values: NativePacked | None = None  # a PairedRingSchedule's values packed before their keys
        self.fused = False

    @property
    def key_rotation(self) -> torch.Tensor | None:
        """The ``[D, D]`` matrix the packed keys' codes were rotated by (what the packed buffers record)."""
        return None if self.packed_keys is None else self.packed_keys.rotation

    @property
    def value_rotation(self) -> torch.Tensor | None:
        """The ``[D, D]`` matrix the packed values' codes were rotated by."""
        return None if self.packed_values is None else self.packed_values.rotation

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A decode step (one token) into the slot the schedule chose beforehand; the inputs
        tagged for :class:`StaticAttention`."""
        if key_states.shape[2] != 1:  # the cache hands its tokens back before such a forward
            raise RuntimeError(f"a layer's CUDA-graph buffers in use got a step of {key_states.shape[2]} tokens")
        self.ring_keys.index_copy_(2, self.schedule.slot_index, key_states)
        self.ring_values.index_copy_(2, self.schedule.slot_index, value_states)
        step = StaticStep(ring=self)
        return attention.tag(key_states, step, STATIC_ATTENTION), attention.tag(value_states, step, None)

    def rotations(self) -> list[torch.Tensor]:
        """The rotation matrices the buffers' codes were rotated by (one per device, shared)."""
        return [m for m in (self.key_rotation, self.value_rotation) if m is not None]

    def nbytes(self) -> dict[str, int]:
        """Bytes the buffers hold while in use (allocated whole: the ring and the packed capacity)."""
        if not self.in_use:
            return {}
        out = {"full_precision": sum(t.numel() * t.element_size() for t in (self.ring_keys, self.ring_values))}
        for packed in (self.packed_keys, self.packed_values, self.pending_values):
            if packed is not None:
                for region, n in packed.nbytes().items():
                    out[region] = out.get(region, 0) + n
        return out

    # -- moving the tokens between the eager stores and the buffers -----------------------

    def adopt(self, layer) -> None:
        """Copy the stores' tokens into the buffers (held tokens into ring slots ``0..m-1`` in
        the schedule's order, the packed region into the packed buffers' first tokens) and free
        the stores' tensors. The schedule has taken over the bookkeeping. ``layer``: the
        :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer` (its geometry and executor)."""
        keys, values = self.keys, self.values
        schedule = self.schedule
        paired = isinstance(schedule, PairedRingSchedule)
        sides = ((keys, schedule.keys), (values, schedule.values))
        if not all(store.positions is held and store.length == held.length for store, held in sides):
            raise RuntimeError("the graph schedule and this layer's stores disagree on their tokens")
        self._allocate(layer)
        if paired:
            self._adopt_paired(layer)
            return
        for ring, store in ((self.ring_keys, keys), (self.ring_values, values)):
            parts = [t for t in (store.fp, store.staging) if t is not None]
            if parts:
                tokens = torch.cat(parts, dim=2)
                ring[:, :, : tokens.shape[2]].copy_(tokens)
        if keys.packed is not None and self.packed_keys is not None:
            self.packed_keys.write(keys.packed, 0)
            self.packed_values.write(values.packed, 0)
        self._adopted(layer)

    def _allocate(self, layer) -> None:
        """Zeroed rings and packed buffers of the schedule's sizes (and pending value rows for
        a :class:`PairedRingSchedule`)."""
        keys, values, schedule = self.keys, self.values, self.schedule
        batch, heads, key_dim = layer.shape
        value_dim = layer.value_head_dim
        dtype, device = layer.dtype, layer.device
        self.ring_keys = torch.zeros(batch, heads, schedule.slots, key_dim, dtype=dtype, device=device)
        self.ring_values = torch.zeros(batch, heads, schedule.slots, value_dim, dtype=dtype, device=device)
        if keys.backend is not None:
            self.packed_keys = _capacity_packed(
                keys.spec, keys.backend, batch, heads, key_dim, schedule.capacity, dtype, device
            )
            self.packed_values = _capacity_packed(
                values.spec, values.backend, batch, heads, value_dim, schedule.capacity, dtype, device
            )
        if isinstance(schedule, PairedRingSchedule):
            self.pending_values = _capacity_packed(
                values.spec, values.backend, batch, heads, value_dim, schedule.slots, dtype, device
            )

    def _adopted(self, layer) -> None:
        """The stores' tensors are copied: free them, choose the kernels, serve the steps."""
        from kvpolicy.executors.kernels import fusable, triton_available

        batch, heads, key_dim = layer.shape
        device = layer.device
        query_like = torch.empty(batch, heads, 1, key_dim, device="meta")
        self.fused = (
            device.type == "cuda"
            and triton_available()
            and key_dim == layer.value_head_dim
            and (self.packed_keys is None or fusable(query_like, self.packed_keys, self.packed_values))
        )
        for store in (self.keys, self.values):
            store.fp = store.staging = store.packed = None
        layer.executor.reset()  # its memos of the stores' tokens: the ring serves them now
        self.in_use = True

    def _adopt_paired(self, layer) -> None:
        """:meth:`adopt` for a :class:`PairedRingSchedule`: each slot's key and value (full
        precision, or dequantized where that side is packed, its packed row then pending), the
        packed keys as they are, each packed value at its key's offset."""
        keys, values, schedule = self.keys, self.values, self.schedule
        device = self.ring_keys.device
        key_index = {p: i for i, p in enumerate(keys.packed_pos.tolist())}
        value_index = {p: i for i, p in enumerate(values.packed_pos.tolist())}
        for ring, store, index in ((self.ring_keys, keys, key_index), (self.ring_values, values, value_index)):
            for region, pos in ((store.fp, store.fp_pos), (store.staging, store.staging_pos)):
                if region is not None:
                    ring.index_copy_(2, indices_to(schedule.slots_of(pos), device), region)
            packed_in_slots = [p for p in schedule.slot_of if p in index]
            if packed_in_slots:  # dequantize_tokens takes host rows
                rows = torch.tensor([index[p] for p in packed_in_slots], dtype=torch.int64)
                slots = indices_to(schedule.slots_of(packed_in_slots), device)
                ring.index_copy_(2, slots, store.packed.dequantize_tokens(rows))
        pending = sorted(schedule.pending)
        if pending:
            rows = indices_to([value_index[p] for p in pending], device)
            self.pending_values.write_rows(values.packed, rows, indices_to(schedule.slots_of(pending), device))
        if keys.packed is not None:
            self.packed_keys.write(keys.packed, 0)
        both = [p for p in key_index if p in value_index]
        if both:
            rows = indices_to([value_index[p] for p in both], device)
            self.packed_values.write_rows(values.packed, rows, indices_to([key_index[p] for p in both], device))
        self._adopted(layer)

    def release(self) -> None:
        """The inverse of :meth:`adopt`: the stores take the schedule's bookkeeping and
        the buffers' tokens (full-precision ones by ring slot, the packed prefix), and the
        buffers are freed."""
        schedule = self.schedule
        if isinstance(schedule, PairedRingSchedule):
            self._release_paired()
            return
        sides = (
            (self.ring_keys, self.packed_keys, self.keys),
            (self.ring_values, self.packed_values, self.values),
        )
        for ring, packed, store in sides:
            self._hand_back_held(ring, store)
            store.packed = _leading_tokens(packed, len(store.packed_pos)) if len(store.packed_pos) else None
        self.free()

    def _hand_back_held(self, ring: torch.Tensor, store) -> None:
        """``store`` catches up with its bookkeeping (which the schedule went on booking) and
        takes its full-precision and staged tokens from their ring slots."""
        store.catch_up()
        store.fp, store.staging = (self._ring_tokens(ring, p) for p in (store.fp_pos, store.staging_pos))

    def _release_paired(self) -> None:
        """:meth:`release` for a :class:`PairedRingSchedule`: values packed in key order (or
        pending) go back in the value store's own order."""
        schedule = self.schedule
        keys, values = self.keys, self.values
        self._hand_back_held(self.ring_keys, keys)
        self._hand_back_held(self.ring_values, values)
        n_keys = len(keys.packed_pos)
        keys.packed = _leading_tokens(self.packed_keys, n_keys) if n_keys else None
        values.packed = None
        if len(values.packed_pos):
            device = self.ring_values.device
            key_index = {p: i for i, p in enumerate(keys.packed_pos.tolist())}
            order = values.packed_pos.tolist()
            settled = [(i, key_index[p]) for i, p in enumerate(order) if p not in schedule.pending]
            pending = [(i, schedule.slot_of[p]) for i, p in enumerate(order) if p in schedule.pending]
            values.packed = self.packed_values.allocate(len(order))
            for source, rows in ((self.packed_values, settled), (self.pending_values, pending)):
                if rows:
                    dst, src = (indices_to(c, device) for c in zip(*rows))
                    values.packed.write_rows(source, src, dst)
        self.free()

    def _ring_tokens(self, ring: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        if not len(positions):
            return None
        return ring.index_select(2, indices_to(self.schedule.slots_of(positions), ring.device))

    def free(self) -> None:
        """Drop the buffers (the stores hold nothing of them: :meth:`release` first to keep the tokens)."""
        self.ring_keys = self.ring_values = self.packed_keys = self.packed_values = self.pending_values = None
        self.in_use = False

    def grow(self, capacity: int) -> None:
        """Packed buffers of ``capacity`` tokens holding what the current ones hold."""
        packed = len(self.schedule.keys.packed_pos)
        sides = (("packed_keys", self.keys, self.ring_keys), ("packed_values", self.values, self.ring_values))
        for name, store, ring in sides:
            old = getattr(self, name)
            batch, heads, _, dim = ring.shape
            new = _capacity_packed(store.spec, store.backend, batch, heads, dim, capacity, ring.dtype, ring.device)
            if packed:
                new.write(old.slice_tokens(0, packed), 0)
            setattr(self, name, new)

    def pack(self, booking: Booking) -> None:
        """Quantize the ring slots ``booking`` packs into the packed buffers at its offset."""
        if isinstance(booking, PairedBooking):
            self._pack_paired(booking)
            return
        if not booking.packed_slots:
            return
        index = booking.packed_index
        for ring, packed, store in (
            (self.ring_keys, self.packed_keys, self.keys),
            (self.ring_values, self.packed_values, self.values),
        ):
            block = store.backend.quantize(ring.index_select(2, index), store.spec)
            packed.write(block, booking.offset)

    def _pack_paired(self, booking: PairedBooking) -> None:
        """Apply a :class:`PairedBooking` (see its fields) to this layer's buffers."""
        keys, values, index = self.keys, self.values, booking.index
        if booking.key_slots:
            block = keys.backend.quantize(self.ring_keys.index_select(2, index["key_slots"]), keys.spec)
            self.packed_keys.write(block, booking.key_offset)
            if booking.dequantized_keys:
                dequantized = block.dequantize().index_select(2, index["dequantized_keys"])
                self.ring_keys.index_copy_(2, index["dequantized_key_slots"], dequantized.to(self.ring_keys.dtype))
        if booking.value_slots:
            rows = values.backend.quantize(self.ring_values.index_select(2, index["value_slots"]), values.spec)
            if "direct" in index:
                self.packed_values.write_rows(rows, index["direct"], index["direct_rows"])
            if "pending" in index:
                self.pending_values.write_rows(rows, index["pending"], index["pending_slots"])
                dequantized = rows.dequantize().index_select(2, index["pending"])
                self.ring_values.index_copy_(2, index["pending_slots"], dequantized.to(self.ring_values.dtype))
        if booking.settled:
            self.packed_values.write_rows(self.pending_values, index["settled_slots"], index["settled_rows"])


_BATCH_FIXED = (
    "a CUDA-graph cache keeps its batch fixed (beam search, batch selection and rollback are not served); "
    "build the cache without cuda_graphs for them"
)


class StaticPolicyCache(KVPolicyCache):
    """A :class:`~kvpolicy.cache.policy_cache.KVPolicyCache` whose layers hold :class:`RingBuffers`, decoded
    through :class:`~kvpolicy.graphs.cuda_graphs.GraphedDecoding` (its :attr:`decoding`).

    ``fallback``: what to do with a call the replayed step does not serve (a padded batch, a
    multi-token step after decoding, beam search's reorders): ``False`` refuses it
    (``cuda_graphs=True``); ``True`` hands the tokens back to the eager layers and goes on
    eagerly (``cuda_graphs="auto"``): after a new turn the next decode step adopts them again,
    after a padded batch or a batch method the cache stays eager.
    """

    def __init__(self, layers: list[KVPolicyLayer], policy_name: str = "", fallback: bool = False):
        super().__init__(layers, policy_name=policy_name)
        from kvpolicy.graphs.cuda_graphs import GraphedDecoding

        self.decoding = GraphedDecoding(self)
        self.fallback = fallback
        self.adopted = False
        #: why this cache decodes eagerly for good (``None``: it may adopt its tokens)
        self.eager_because: str | None = None
        self.schedules: list[tuple[RingSchedule, list[KVPolicyLayer]]] = []
        for layer in layers:
            for schedule, members in self.schedules:
                if schedule is layer.ring.schedule:
                    members.append(layer)
                    break
            else:
                self.schedules.append((layer.ring.schedule, [layer]))

    def may_adopt(self, attention_mask: torch.Tensor | None) -> bool:
        """Whether the next decode step may run on the buffers (refuses a padded batch unless
        ``fallback``). One host synchronization, at adoption only."""
        if self.eager_because is not None or not self.get_seq_length():
            return False
        if attention_mask is not None and not bool(attention_mask.all()):
            self._leave("a CUDA-graph cache serves batches without padding (its replayed step attends every held "
                        "token of every row); decode a left-padded batch with a cache built without cuda_graphs",
                        "a padded batch")  # fmt: skip
            return False
        return True

    def adopt(self) -> None:
        """Before the first decode step: the schedules take over each eager store's
        bookkeeping and every layer's tokens move into its buffers."""
        for schedule, layers in self.schedules:
            first = layers[0]
            schedule.start(first.key_store, first.value_store, first.shape[0], first.device)
            for layer in layers:
                layer.ring.adopt(layer)
        self.adopted = True
        if self.fallback and any(layer.device.type == "cuda" and not layer.ring.fused for layer in self.layers):
            self._leave("", "no fused kernel serves these shapes")  # auto only: no float32 sweep over the capacity

    def release(self, refusal: str) -> None:
        """Hand every layer's tokens back to its stores (``fallback``), or refuse with ``refusal``."""
        if not self.fallback:
            raise NotSupportedError(refusal)
        for layer in self.layers:
            layer.ring.release()
        self.adopted = False
        self.decoding.drop()

    def _leave(self, refusal: str, because: str) -> None:
        """Decode eagerly from now on (``fallback``), or refuse with ``refusal``."""
        if not self.fallback:
            raise NotSupportedError(refusal)
        if self.adopted:
            self.release(refusal)
        self.eager_because = because

    def book_step(self) -> None:
        """After a decode step: book its token, pack what the policy packs (growing the packed
        buffers first when they are full), free what leaves."""
        for schedule, layers in self.schedules:
            booking = schedule.book()
            needed = booking.packed_through
            if needed > schedule.capacity:
                capacity = schedule.grow(needed)
                for layer in layers:
                    layer.ring.grow(capacity)
                self.decoding.drop()  # the captured step read the old buffers
            for layer in layers:
                layer.ring.pack(booking)
            schedule.commit(booking)

    def memory(self) -> MemoryReport:
        """:meth:`KVPolicyCache.memory`, plus the bookkeeping each schedule keeps for its layers
        (biases, slot index and positions: counted once per schedule)."""
        report = super().memory()
        bookkeeping = sum(schedule.nbytes() for schedule, _ in self.schedules) if self.adopted else 0
        if not bookkeeping:
            return report
        return attrs.evolve(report, bytes_by_region={**report.bytes_by_region, "bookkeeping": bookkeeping})

    def reset(self) -> None:
        super().reset()
        self.adopted = False
        self.eager_because = None
        self.decoding.drop()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._leave(_BATCH_FIXED, "beam search")
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._leave(_BATCH_FIXED, "a batch method")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._leave(_BATCH_FIXED, "a batch method")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        self._leave(_BATCH_FIXED, "a rollback")
        super().crop(tokens_to_remove)


def build_static_cache(policy, model, specs, max_cache_len: int | None, fallback: bool = False) -> StaticPolicyCache:
    """``policy.make_cache(model, cuda_graphs=True)``: one static layer per decoder layer,
    sharing a :class:`RingSchedule` per retention schedule; refuses what the replayed step
    cannot serve (:func:`~kvpolicy.graphs.capability.serving_refusal`). ``fallback``: see
    :class:`StaticPolicyCache` (``cuda_graphs="auto"``)."""
    from kvpolicy.graphs import cuda_graphs

    if max_cache_len is not None and (
        not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1
    ):
        raise ConfigError(
            "max_cache_len", max_cache_len, "a positive number of tokens (the prompt plus the new tokens) or None"
        )
    layers = policy_layers(policy, model, specs)
    refusal = serving_refusal(policy, model, specs, max_cache_len, layers)
    if refusal is not None:
        raise NotSupportedError(f"cuda_graphs: {refusal}. Build the cache without cuda_graphs")
    schedules: dict[tuple, RingSchedule] = {}
    for layer in layers:
        keys, values = layer.key_store, layer.value_store
        key = (keys.positions.key, values.positions.key)  # the bookkeeping the cache gives them shares these
        if key not in schedules:
            schedules[key] = schedule_for(keys, values, max_cache_len)
        layer.ring = RingBuffers(schedules[key], keys, values)
    attention.attach(model)
    cuda_graphs.install(model)
    return StaticPolicyCache(layers, policy_name=policy.name, fallback=fallback)
