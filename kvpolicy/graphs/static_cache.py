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
retained alike or paired (:mod:`~kvpolicy.graphs.ring_schedule`), native
quantization, rotated or not (the buffers hold the rotated codes; the step rotates the query,
the ring and the output), batches without padding. Built with
``cuda_graphs=True`` anything else is refused; built by ``cuda_graphs="auto"`` (the default on
CUDA) the cache hands its tokens back to the stores instead (:meth:`RingBuffers.release`) and goes
on eagerly, so a user never meets a refusal the eager cache would not give. Without a
declared ``max_cache_len`` the packed buffers grow (by a quarter) as decoding fills them, and
the step is captured again.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy.cache import attention
from kvpolicy.cache.policy_cache import KVPolicyCache, KVPolicyLayer, MemoryReport
from kvpolicy.errors import ConfigError, NotSupportedError
from kvpolicy.executors import partial as pa
from kvpolicy.graphs.capability import serving_refusal
from kvpolicy.graphs.ring_schedule import Booking, RingSchedule, schedule_for
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
    capacity under their biases (packed keys paired with value rows where keys and values are
    retained differently). On CUDA the fused decode kernels (two launches, fixed shapes);
    elsewhere the same sums in float32 (:mod:`kvpolicy.executors.partial`). Where a side is
    rotated (:mod:`kvpolicy.quantizers.rotation`) the step runs in the rotated space: the query
    and the ring's keys by the keys' matrix, the ring's values by the values', the output
    rotated back."""

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
                schedule.ring_bias, schedule.packed_bias if packed_keys is not None else None, schedule.value_rows,
            ), value_rotation)  # fmt: skip
        kv_heads = ring_keys.shape[1]
        grouped = pa.group_queries(query, kv_heads)
        result = pa.partial(grouped, ring_keys, ring_values, scaling, schedule.ring_bias[:, None, None, :])
        if packed_keys is not None:
            bias = schedule.packed_bias[:, None, None, :]
            stored_keys, stored_values = packed_keys.dequantize_stored(), packed_values.dequantize_stored()
            if schedule.value_rows is not None:  # each key's value row (-1: none, masked by the bias)
                stored_values = stored_values.index_select(2, schedule.value_rows.clamp(min=0))
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
        self.fused = False

    @property
    def key_rotation(self) -> torch.Tensor | None:
        """The ``[D, D]`` matrix the packed keys' codes were rotated by (what the packed buffers record)."""
        return None if self.packed_keys is None else self.packed_keys.rotation

    @property
    def value_rotation(self) -> torch.Tensor | None:
        """The ``[D, D]`` matrix the packed values' codes were rotated by."""
        return None if self.packed_values is None else self.packed_values.rotation

    def _sides(self):
        """``(ring, packed buffers, store)`` of the keys, then of the values."""
        return (self.ring_keys, self.packed_keys, self.keys), (self.ring_values, self.packed_values, self.values)

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
        for packed in (self.packed_keys, self.packed_values):
            if packed is not None:
                for region, n in packed.nbytes().items():
                    out[region] = out.get(region, 0) + n
        return out

    # -- moving the tokens between the eager stores and the buffers -----------------------

    def adopt(self, layer) -> None:
        """Copy the stores' tokens into the buffers (held tokens into their ring slots, each
        side's packed region into its packed buffers' first tokens; where keys and values are
        paired, a position packed on one side only also gets that side's dequantized token in
        its slot) and free the stores' tensors. The schedule has taken over the bookkeeping.
        ``layer``: the :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer` (geometry, executor)."""
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
        self._adopted(layer)

    def _allocate(self, layer) -> None:
        """Zeroed rings and packed buffers of the schedule's sizes."""
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

    def _adopted(self, layer) -> None:
        """The stores' tensors are copied: free them, choose the kernels, serve the steps."""
        from kvpolicy.executors.kernels import decode_fusable, triton_available

        batch, heads, key_dim = layer.shape
        query_like = torch.empty(batch, heads, 1, key_dim, device="meta")
        self.fused = (
            layer.device.type == "cuda"
            and triton_available()
            and decode_fusable(
                query_like, layer.value_head_dim, self.packed_keys, self.packed_values, self.schedule.paired
            )
        )
        for store in (self.keys, self.values):
            store.fp = store.staging = store.packed = None
        layer.executor.reset()  # its memos of the stores' tokens: the ring serves them now
        self.in_use = True

    def release(self) -> None:
        """The inverse of :meth:`adopt`: the stores catch up with the bookkeeping the schedule
        went on booking and take the buffers' tokens (full-precision ones by ring slot, each
        side's packed prefix), and the buffers are freed."""
        for ring, packed, store in self._sides():
            store.catch_up()
            store.fp, store.staging = (self._ring_tokens(ring, p) for p in (store.fp_pos, store.staging_pos))
            n = len(store.packed_pos)
            store.packed = packed.slice_tokens(0, n).map_batch(torch.clone) if n else None
        self.free()

    def _ring_tokens(self, ring: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        if not len(positions):
            return None
        return ring.index_select(2, indices_to(self.schedule.slots_of(positions), ring.device))

    def free(self) -> None:
        """Drop the buffers (the stores hold nothing of them: :meth:`release` first to keep the tokens)."""
        self.ring_keys = self.ring_values = self.packed_keys = self.packed_values = None
        self.in_use = False

    def grow(self, capacity: int) -> None:
        """Packed buffers of ``capacity`` tokens holding what the current ones hold."""
        for name in ("packed_keys", "packed_values"):
            old = getattr(self, name)
            new = old.allocate(capacity)
            new.write(old, 0)
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
                dequantized = block.dequantize().index_select(2, side.stay)
                ring.index_copy_(2, side.stay_slots, dequantized.to(ring.dtype))


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


def build_static_cache(
    policy, model, specs, layers: list[KVPolicyLayer], max_cache_len: int | None, fallback: bool = False
) -> StaticPolicyCache:
    """``policy.make_cache(model, cuda_graphs=True)``: the policy's cache ``layers`` (one per
    decoder layer in ``specs``), each given :class:`RingBuffers`, sharing a :class:`RingSchedule`
    per retention schedule; refuses what the replayed step cannot serve
    (:func:`~kvpolicy.graphs.capability.serving_refusal`). ``fallback``: see
    :class:`StaticPolicyCache` (``cuda_graphs="auto"``)."""
    from kvpolicy.graphs import cuda_graphs

    if max_cache_len is not None and (
        not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1
    ):
        raise ConfigError(
            "max_cache_len", max_cache_len, "a positive number of tokens (the prompt plus the new tokens) or None"
        )
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
