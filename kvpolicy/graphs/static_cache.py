"""Buffers allocated once, whose decode step has static shapes (for CUDA-graph decoding).

A :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer` built by ``make_cache(model,
cuda_graphs=...)`` also holds :class:`RingBuffers`: a ring of full-precision slots
``[B, H, slots, D]`` (kept and staged tokens) and packed buffers for the schedule's capacity,
each under an additive bias (``[B, slots]``, ``[B, capacity]``; 0 opens, ``-inf`` closes). A
decode step writes its token into a slot chosen beforehand and attends everything under the
biases, so it can be captured and replayed (:mod:`kvpolicy.graphs.cuda_graphs`); between steps
the host books it on the eager stores' own bookkeeping
(:class:`~kvpolicy.graphs.ring_schedule.RingSchedule`). Multi-token steps run on the stores;
the tokens move into the buffers at the first decode step (:meth:`RingBuffers.adopt`) and back
(:meth:`RingBuffers.release`) where a call is not served. See the concepts page, "Decoding
from a CUDA graph".
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy.cache import attention
from kvpolicy.cache.policy_cache import KVPolicyCache, KVPolicyLayer, MemoryReport
from kvpolicy.errors import NotSupportedError
from kvpolicy.executors.fused import biased_decode
from kvpolicy.graphs.capability import serving_refusal
from kvpolicy.graphs.ring_schedule import Booking, RingSchedule, schedule_for
from kvpolicy.transfer import indices_to


class RingBuffers:
    """One layer's tokens in buffers allocated once (see the module docstring), and the
    attention of its replayed step. ``schedule``: the bookkeeping shared with every layer of the
    same retention schedule; ``keys``/``values``: the layer's stores, whose tokens the buffers
    take over (:meth:`adopt`) and hand back (:meth:`release`).

    A decode step tags its tensors with the buffers themselves, as step and executor of the
    ``"kvpolicy"`` attention (never row sinks or a prefill; the policies served demote, so
    never ``lossless``)."""

    row_sinks = after_prefill = None
    lossless = False

    def __init__(self, schedule: RingSchedule, keys, values):
        self.schedule = schedule
        self.keys, self.values = keys, values
        self.ring_keys = self.ring_values = self.packed_keys = self.packed_values = None
        self.in_use = self.fused = False

    def _sides(self):
        """``(ring, packed buffers, store)`` of the keys, then of the values."""
        return (self.ring_keys, self.packed_keys, self.keys), (self.ring_values, self.packed_values, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """A decode step's ``[B, H, 1, D]`` token into the slot the schedule chose beforehand."""
        if key_states.shape[2] != 1:  # the cache hands its tokens back before such a forward
            raise RuntimeError(f"a layer's CUDA-graph buffers in use got a step of {key_states.shape[2]} tokens")
        self.ring_keys.index_copy_(2, self.schedule.slot_index, key_states)
        self.ring_values.index_copy_(2, self.schedule.slot_index, value_states)
        return attention.tag(key_states, self, self), attention.tag(value_states, self, None)

    def attend(self, module, query, step, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        """The ring and the packed capacity under the schedule's biases (packed keys paired with
        value rows where keys and values are retained differently): the fused kernels on CUDA,
        elsewhere the same sums in float32."""
        schedule = self.schedule
        return biased_decode(
            query, [(self.ring_keys, self.ring_values)], self.packed_keys, self.packed_values,
            scaling if scaling is not None else query.shape[-1] ** -0.5, schedule.ring_bias,
            schedule.packed_bias if self.packed_keys is not None else None, schedule.value_rows,
            fused=query.is_cuda and self.fused,
        )  # fmt: skip

    def rotations(self) -> list[torch.Tensor]:
        """The rotation matrices the packed codes were rotated by (one per device, shared)."""
        packed = (self.packed_keys, self.packed_values)
        return [p.rotation for p in packed if p is not None and p.rotation is not None]

    def nbytes(self) -> dict[str, int]:
        """Bytes the buffers hold while in use (allocated whole: the ring and the packed capacity)."""
        if not self.in_use:
            return {}
        out = {"full_precision": sum(t.numel() * t.element_size() for t in (self.ring_keys, self.ring_values))}
        for packed in (self.packed_keys, self.packed_values):
            for region, n in (packed.nbytes() if packed is not None else {}).items():
                out[region] = out.get(region, 0) + n
        return out

    def adopt(self, layer: KVPolicyLayer) -> None:
        """Copy the stores' tokens into the buffers (held tokens into their ring slots, each
        side's packed region into its packed buffers' first tokens; where keys and values are
        paired, a position packed on one side only also gets that side's dequantized token in
        its slot) and free the stores' tensors. The schedule has taken over the bookkeeping."""
        schedule = self.schedule
        sides = ((self.keys, schedule.keys), (self.values, schedule.values))
        if not all(store.positions is held and store.length == held.length for store, held in sides):
            raise RuntimeError("the graph schedule and this layer's stores disagree on their tokens")
        self._allocate(layer)
        for ring, packed, store in self._sides():
            for region, pos in ((store.fp, store.fp_pos), (store.staging, store.staging_pos)):
                if region is not None:
                    ring.index_copy_(2, indices_to(schedule.slots_of(pos), ring.device), region)
            if store.packed is None or packed is None:
                continue
            packed.write(store.packed, 0)
            row = {p: i for i, p in enumerate(store.packed_pos.tolist())}
            in_slots = [p for p in schedule.slot_of if p in row] if schedule.paired else []
            if in_slots:  # dequantize_tokens takes host rows
                tokens = store.packed.dequantize_tokens(torch.tensor([row[p] for p in in_slots]))
                ring.index_copy_(2, indices_to(schedule.slots_of(in_slots), ring.device), tokens)
        for store in (self.keys, self.values):
            store.fp = store.staging = store.packed = None
        layer.executor.reset()  # its memos of the stores' tokens: the ring serves them now
        self.in_use = True

    def _allocate(self, layer: KVPolicyLayer) -> None:
        """Zeroed rings and packed buffers of the schedule's sizes (the packed ones in each
        store's layout, its rotation included); whether the fused kernels serve them."""
        from kvpolicy.executors.kernels import decode_fusable, triton_available

        (batch, heads, key_dim), value_dim, slots = layer.shape, layer.value_head_dim, self.schedule.slots
        like = {"dtype": layer.dtype, "device": layer.device}
        self.ring_keys = torch.zeros(batch, heads, slots, key_dim, **like)
        self.ring_values = torch.zeros(batch, heads, slots, value_dim, **like)
        if self.keys.backend is not None:
            self.packed_keys, self.packed_values = (
                store.backend.quantize(torch.zeros(batch, heads, store.block, dim, **like), store.spec).allocate(
                    self.schedule.capacity
                )
                for store, dim in ((self.keys, key_dim), (self.values, value_dim))
            )
        query_like = torch.empty(batch, heads, 1, key_dim, device="meta")
        self.fused = (
            layer.device.type == "cuda"
            and triton_available()
            and decode_fusable(query_like, value_dim, self.packed_keys, self.packed_values, self.schedule.paired)
        )

    def release(self) -> None:
        """The inverse of :meth:`adopt`: the stores catch up with the bookkeeping the schedule
        went on booking and take the buffers' tokens (full-precision ones by ring slot, each
        side's packed prefix), and the buffers are freed."""
        for ring, packed, store in self._sides():
            store.catch_up()
            store.fp, store.staging = (
                ring.index_select(2, indices_to(self.schedule.slots_of(p), ring.device)) if len(p) else None
                for p in (store.fp_pos, store.staging_pos)
            )
            n = len(store.packed_pos)
            store.packed = packed.slice_tokens(0, n).map_batch(torch.clone) if n else None
        self.free()

    def free(self) -> None:
        """Drop the buffers (the stores hold nothing of them: :meth:`release` first to keep the tokens)."""
        self.ring_keys = self.ring_values = self.packed_keys = self.packed_values = None
        self.in_use = False

    def grow(self, capacity: int) -> None:
        """Packed buffers of ``capacity`` tokens holding what the current ones hold."""
        for name in ("packed_keys", "packed_values"):
            new = getattr(self, name).allocate(capacity)
            new.write(getattr(self, name), 0)
            setattr(self, name, new)

    def pack(self, booking: Booking) -> None:
        """Quantize the ring slots ``booking`` packs into each side's packed buffers at its
        offset; a token that keeps its slot (its other side is not packed) takes its
        dequantized value there."""
        for (ring, packed, store), side in zip(self._sides(), (booking.keys, booking.values), strict=True):
            if not side.slots:
                continue
            block = store.backend.quantize(ring.index_select(2, side.index), store.spec)
            packed.write(block, side.offset)
            if side.stay is not None:
                ring.index_copy_(2, side.stay_slots, block.dequantize().index_select(2, side.stay).to(ring.dtype))


class StaticPolicyCache(KVPolicyCache):
    """A :class:`~kvpolicy.cache.policy_cache.KVPolicyCache` whose layers hold :class:`RingBuffers`,
    decoded through :class:`~kvpolicy.graphs.cuda_graphs.GraphedDecoding` (its :attr:`decoding`).

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
        groups: dict[int, tuple[RingSchedule, list[KVPolicyLayer]]] = {}
        for layer in layers:
            groups.setdefault(id(layer.ring.schedule), (layer.ring.schedule, []))[1].append(layer)
        self.schedules = list(groups.values())

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
            if booking.packed_through > schedule.capacity:
                capacity = schedule.grow(booking.packed_through)
                for layer in layers:
                    layer.ring.grow(capacity)
                self.decoding.drop()  # the captured step read the old buffers
            for layer in layers:
                layer.ring.pack(booking)
            schedule.commit(booking)

    def memory(self) -> MemoryReport:
        """:meth:`KVPolicyCache.memory`, plus the bookkeeping each schedule keeps on the device
        for its layers (counted once per schedule)."""
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

    _BATCH_FIXED = (
        "a CUDA-graph cache keeps its batch fixed (beam search, batch selection and rollback are not served); "
        "build the cache without cuda_graphs for them"
    )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._leave(self._BATCH_FIXED, "beam search")
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._leave(self._BATCH_FIXED, "a batch method")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._leave(self._BATCH_FIXED, "a batch method")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        self._leave(self._BATCH_FIXED, "a rollback")
        super().crop(tokens_to_remove)


def build_static_cache(
    policy, model, specs, layers: list[KVPolicyLayer], max_cache_len: int | None, fallback: bool = False
) -> StaticPolicyCache:
    """``policy.make_cache(model, cuda_graphs=True)``: the policy's cache ``layers`` (one per
    decoder layer in ``specs``), each given :class:`RingBuffers`, sharing a :class:`RingSchedule`
    per retention schedule; refuses what the replayed step cannot serve
    (:func:`~kvpolicy.graphs.capability.serving_refusal`). ``fallback``: see
    :class:`StaticPolicyCache` (``cuda_graphs="auto"``)."""
    from kvpolicy.graphs import cuda_graphs

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
