"""Preallocated cache layers whose decode step has static shapes (for CUDA-graph decoding).

An eager :class:`~kvpolicy.cache.KVPolicyLayer` replaces its tensors at every step, so each
step's kernels see new shapes and pointers and the host must issue them one by one. A
:class:`StaticPolicyLayer` holds the same tokens in buffers allocated once:

* a **ring** of full-precision slots ``[B, H, slots, D]`` for the kept tokens and the staged
  ones (both are full precision, so attention treats them alike), with an additive bias
  ``[B, slots]``: 0 for a held slot, ``-inf`` for a free one;
* the **packed region** for up to ``max_cache_len`` tokens (native codes, scales and zeros),
  with a bias ``[B, capacity]`` that opens each block as it is packed.

A decode step writes the new token into the slot chosen beforehand (its index lives on the
device) and attends the whole ring and the whole packed capacity under the two biases: the
same kernels on the same buffers at every step, so the step can be captured once and
replayed (:mod:`kvpolicy.cuda_graphs`). Between steps the host books the token
(:class:`RingSchedule`): which tokens the policy keeps, stages, packs or evicts is decided by
the eager store's own code (a :class:`~kvpolicy.store.TensorStore` over one-channel
placeholders), so the graph path holds exactly the tokens, at exactly the precision, that
eager decoding holds. Packing a block quantizes its ring slots into the packed buffers
(eager operations, once per block).

The prefill runs eagerly (any length); afterwards its state is copied into the buffers.
Served: policies whose keys and values are retained alike, native quantization without
rotation, no left padding; everything else is refused when the cache is built.
"""

from __future__ import annotations

import attrs
import torch
from transformers.cache_utils import CacheLayerMixin

from kvpolicy import attention
from kvpolicy.backends.native import NativePacked, NativeQuantizer
from kvpolicy.cache import KVPolicyCache
from kvpolicy.errors import ConfigError, NotSupportedError
from kvpolicy.executors import partial as pa
from kvpolicy.store import TensorStore
from kvpolicy.transfer import to_device


@attrs.frozen
class _Counted:
    """What the schedule's placeholder store packs: a token count, no data."""

    num_tokens: int


class _CountingBackend:
    """A quantizer backend that only counts (the schedule needs positions, not values)."""

    def quantize(self, x: torch.Tensor, spec) -> _Counted:
        return _Counted(x.shape[2])

    def concat(self, blocks: list[_Counted]) -> _Counted:
        return _Counted(sum(b.num_tokens for b in blocks))


@attrs.frozen
class Booking:
    """What one step changed: ``packed_slots``, the ring slots to quantize (in packing order) at
    packed offset ``offset``, and ``packed_index``, the same slots on the device (one upload for
    every layer); ``freed`` ring slots (packed or evicted)."""

    packed_slots: list[int]
    offset: int
    freed: list[int]
    packed_index: torch.Tensor | None = None


NOTHING_LEFT = Booking([], 0, [])


class RingSchedule:
    """Host bookkeeping shared by the layers of one retention schedule: which position sits in
    which ring slot, and what leaves the full-precision set at each step (decided by a
    placeholder :class:`~kvpolicy.store.TensorStore` running the eager store's code)."""

    def __init__(self, store: TensorStore, slots: int, max_cache_len: int):
        self.store = TensorStore(store.unbound_selector, store.demote, store.spec, _CountingBackend(), store.block)
        self.slots = slots
        self.max_cache_len = max_cache_len
        #: packed tokens the buffers hold: ``max_cache_len`` rounded up to whole packing blocks
        self.capacity = -(-max_cache_len // store.block) * store.block
        # set by start(), after the prefill
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.next_slot = -1
        self.slot_index: torch.Tensor | None = None  # int64 [1] on the device: the next token's slot
        self.ring_bias: torch.Tensor | None = None  # float32 [B, slots]
        self.packed_bias: torch.Tensor | None = None  # float32 [B, capacity]

    @property
    def length(self) -> int:
        return self.store.length

    def held_positions(self) -> list[int]:
        """Positions in full precision (kept, then staged), as the eager store orders them."""
        return torch.cat([self.store.fp_pos, self.store.staging_pos]).tolist()

    def start(self, prefill: int, batch: int, device: torch.device) -> None:
        """Book a prefill of ``prefill`` tokens: the held ones take slots ``0..m-1`` in order."""
        if prefill > self.max_cache_len:
            raise NotSupportedError(f"a prompt of {prefill} tokens exceeds max_cache_len={self.max_cache_len}")
        self.store.append(torch.zeros(1, 1, prefill, 1))
        held = self.held_positions()
        if len(held) >= self.slots:
            raise RuntimeError(f"{len(held)} held tokens do not fit {self.slots} ring slots")
        self.slot_of = {p: s for s, p in enumerate(held)}
        self.free = list(range(self.slots - 1, len(held) - 1, -1))
        self.ring_bias = torch.full((batch, self.slots), float("-inf"), dtype=torch.float32, device=device)
        self.ring_bias[:, : len(held)] = 0.0
        self.packed_bias = torch.full((batch, self.capacity), float("-inf"), dtype=torch.float32, device=device)
        self.packed_bias[:, : len(self.store.packed_pos)] = 0.0
        self.slot_index = torch.zeros(1, dtype=torch.int64, device=device)
        self._take_next_slot()

    def book(self) -> Booking:
        """After a decode step wrote position ``length`` into :attr:`next_slot`: what leaves."""
        if self.length + 1 > self.max_cache_len:
            raise NotSupportedError(
                f"decoding past max_cache_len={self.max_cache_len} tokens: build the cache with a larger max_cache_len"
            )
        position, packed_before = self.length, len(self.store.packed_pos)
        self.slot_of[position] = self.next_slot
        self.store.append(torch.zeros(1, 1, 1, 1))
        if len(self.store.fp_pos) + len(self.store.staging_pos) == len(self.slot_of):
            return NOTHING_LEFT  # every held token stays in full precision (most steps)
        held = set(self.held_positions())
        packed = self.store.packed_pos[packed_before:].tolist()
        packed_slots = [self.slot_of[p] for p in packed]
        freed = [self.slot_of.pop(p) for p in [p for p in self.slot_of if p not in held]]
        index = to_device(torch.tensor(packed_slots), self.ring_bias.device) if packed_slots else None
        return Booking(packed_slots, packed_before, freed, index)

    def commit(self, booking: Booking) -> None:
        """After the layers packed what ``booking`` says: open the packed block, free the
        slots, choose the next token's slot."""
        if booking.packed_slots:
            stop = booking.offset + len(booking.packed_slots)
            self.packed_bias[:, booking.offset : stop] = 0.0
        if booking.freed:
            self.ring_bias.index_fill_(1, to_device(torch.tensor(booking.freed), self.ring_bias.device), float("-inf"))
            self.free.extend(booking.freed)
        self._take_next_slot()

    def _take_next_slot(self) -> None:
        if not self.free:
            raise RuntimeError("the ring has no free slot: its size is below the policy's budget plus a block")
        self.next_slot = self.free.pop()
        self.ring_bias[:, self.next_slot] = 0.0  # the next step writes it before attending
        self.slot_index.fill_(self.next_slot)


@attrs.frozen
class StaticStep:
    """What a static layer hands its attention (``row_sinks``/``after_prefill``: never used)."""

    layer: StaticPolicyLayer
    row_sinks: None = None
    after_prefill: None = None


class StaticAttention:
    """Attention of a static layer's decode step: the ring and the packed capacity under their
    biases. On CUDA the fused decode kernels (two launches, fixed shapes); elsewhere the same
    sums in float32 (:mod:`kvpolicy.executors.partial`)."""

    name = "static"

    def attend(self, module, query, step: StaticStep, attention_mask, scaling=None, **kwargs) -> torch.Tensor:
        layer = step.layer
        schedule = layer.schedule
        b, hq, q, d = query.shape
        scaling = scaling if scaling is not None else d**-0.5
        packed_keys, packed_values = layer.packed_keys, layer.packed_values
        if query.is_cuda and layer.fused:
            from kvpolicy.executors.kernels import decode_attention

            return decode_attention(
                query, [(layer.ring_keys, layer.ring_values)], packed_keys, packed_values, scaling,
                schedule.ring_bias, schedule.packed_bias if packed_keys is not None else None,
            )  # fmt: skip
        kv_heads = layer.ring_keys.shape[1]
        grouped = pa.group_queries(query, kv_heads)
        result = pa.partial(grouped, layer.ring_keys, layer.ring_values, scaling, schedule.ring_bias[:, None, None, :])
        if packed_keys is not None:
            bias = schedule.packed_bias[:, None, None, :]
            part = pa.partial(grouped, packed_keys.dequantize(), packed_values.dequantize(), scaling, bias)
            result = pa.merge([result, part])
        return pa.ungroup_output(result[0], hq, q).to(query.dtype)


STATIC_ATTENTION = StaticAttention()


def _capacity_packed(spec, backend, batch, heads, dim, capacity, dtype, device) -> NativePacked:
    """Zeroed native buffers for ``capacity`` packed tokens, in ``spec``'s layout."""
    probe = backend.quantize(torch.zeros(batch, heads, spec.group_size if spec.axis == "channel" else 1, dim,
                                         dtype=dtype, device=device), spec)  # fmt: skip
    per = probe.num_tokens
    codes = torch.zeros(batch, heads, capacity, probe.codes.shape[-1], dtype=probe.codes.dtype, device=device)
    scale_tokens = capacity // per * probe.scale.shape[2]
    scale = torch.zeros(batch, heads, scale_tokens, probe.scale.shape[-1], dtype=probe.scale.dtype, device=device)
    return NativePacked(codes, scale, torch.zeros_like(scale), probe.bits, probe.group_size, probe.axis)


def _write_block(dst: NativePacked, block: NativePacked, offset: int) -> None:
    """Copy ``block`` into ``dst`` at token ``offset`` (a multiple of a per-channel group)."""
    n = block.num_tokens
    dst.codes[:, :, offset : offset + n].copy_(block.codes)
    if dst.axis == "channel":
        start = offset // dst.group_size
        dst.scale[:, :, start : start + block.scale.shape[2]].copy_(block.scale)
        dst.zero[:, :, start : start + block.zero.shape[2]].copy_(block.zero)
    else:
        dst.scale[:, :, offset : offset + n].copy_(block.scale)
        dst.zero[:, :, offset : offset + n].copy_(block.zero)


class StaticPolicyLayer(CacheLayerMixin):
    """One decoder layer's cache in preallocated buffers (see the module docstring).

    ``eager``: the policy's own layer, which serves the prefill and whose stores' state is then
    copied here; ``schedule``: the bookkeeping shared with every layer of the same policy.
    """

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, eager, schedule: RingSchedule):
        super().__init__()
        self.eager = eager
        self.schedule = schedule
        self.adopted = False
        self._awaiting_attention = False
        self.ring_keys = self.ring_values = None
        self.packed_keys = self.packed_values = None
        self.fused = False

    # -- the prefill, then the copy into the buffers ------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The prefill through the eager layer; each later step (one token) into the ring."""
        if not self.adopted:
            return self.eager.update(key_states, value_states, *args, **kwargs)
        if key_states.shape[2] != 1:
            raise NotSupportedError(
                f"a CUDA-graph cache decodes one token per step after its prefill (got {key_states.shape[2]}): "
                "a second turn or a chunked prefill needs a new cache, or a cache built without cuda_graphs"
            )
        self.ring_keys.index_copy_(2, self.schedule.slot_index, key_states)
        self.ring_values.index_copy_(2, self.schedule.slot_index, value_states)
        step = StaticStep(self)
        return attention.tag(key_states, step, STATIC_ATTENTION), attention.tag(value_states, step, None)

    def adopt(self) -> None:
        """After the prefill's forward: copy the eager stores' tokens into the buffers (held
        tokens into ring slots ``0..m-1`` in the schedule's order, the packed region into the
        packed buffers' first tokens) and free the eager tensors."""
        keys, values = self.eager.key_store, self.eager.value_store
        schedule = self.schedule
        held = schedule.held_positions()
        eager_held = torch.cat([keys.fp_pos, keys.staging_pos]).tolist()
        if held != eager_held or schedule.store.packed_pos.tolist() != keys.packed_pos.tolist():
            raise RuntimeError("the graph schedule and the eager store disagree on the prefill's tokens")
        batch, heads, key_dim = self.eager.shape
        value_dim = self.eager.value_head_dim
        dtype, device = self.eager.dtype, self.eager.device
        self.ring_keys = torch.zeros(batch, heads, schedule.slots, key_dim, dtype=dtype, device=device)
        self.ring_values = torch.zeros(batch, heads, schedule.slots, value_dim, dtype=dtype, device=device)
        for ring, store in ((self.ring_keys, keys), (self.ring_values, values)):
            parts = [t for t in (store.fp, store.staging) if t is not None]
            if parts:
                tokens = torch.cat(parts, dim=2)
                ring[:, :, : tokens.shape[2]].copy_(tokens)
        if keys.backend is not None:
            self.packed_keys = _capacity_packed(
                keys.spec, keys.backend, batch, heads, key_dim, schedule.capacity, dtype, device
            )
            self.packed_values = _capacity_packed(
                values.spec, values.backend, batch, heads, value_dim, schedule.capacity, dtype, device
            )
            if keys.packed is not None:
                _write_block(self.packed_keys, keys.packed, 0)
                _write_block(self.packed_values, values.packed, 0)
        from kvpolicy.executors.kernels import fusable, triton_available

        query_like = torch.empty(batch, heads, 1, key_dim, device="meta")
        self.fused = (
            device.type == "cuda"
            and triton_available()
            and key_dim == value_dim
            and (self.packed_keys is None or fusable(query_like, self.packed_keys, self.packed_values))
        )
        self.eager.reset()
        self.adopted = True

    def pack(self, booking: Booking) -> None:
        """Quantize the ring slots ``booking`` packs into the packed buffers at its offset."""
        if not booking.packed_slots:
            return
        index = booking.packed_index
        for ring, packed, store in (
            (self.ring_keys, self.packed_keys, self.eager.key_store),
            (self.ring_values, self.packed_values, self.eager.value_store),
        ):
            block = store.backend.quantize(ring.index_select(2, index), store.spec)
            _write_block(packed, block, booking.offset)

    # -- what transformers and the memory report ask -------------------------------------

    def lazy_initialization(self, key_states, value_states) -> None:  # the eager layer initializes
        pass

    @property
    def is_initialized(self) -> bool:
        return self.adopted or self.eager.is_initialized

    @is_initialized.setter
    def is_initialized(self, value) -> None:  # CacheLayerMixin.__init__ sets it
        pass

    def get_seq_length(self) -> int:
        return self.schedule.length if self.adopted else self.eager.get_seq_length()

    def held_tokens(self) -> int:
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.schedule.max_cache_len

    @property
    def demoted(self) -> bool:
        store = self.schedule.store
        return bool(len(store.packed_pos) or len(store.staging_pos) or store.evicted)

    @property
    def shape(self):
        return self.eager.shape

    @property
    def value_head_dim(self) -> int:
        return self.eager.value_head_dim

    @property
    def dtype(self):
        return self.eager.dtype

    def nbytes(self) -> dict[str, int]:
        """Bytes the buffers hold (allocated whole: the ring and the packed capacity)."""
        if not self.adopted:
            return self.eager.nbytes()
        out = {"full_precision": sum(t.numel() * t.element_size() for t in (self.ring_keys, self.ring_values))}
        for packed in (self.packed_keys, self.packed_values):
            if packed is not None:
                for region, n in packed.nbytes().items():
                    out[region] = out.get(region, 0) + n
        return out

    def reset(self) -> None:
        raise NotSupportedError("a CUDA-graph cache serves one prompt: build a new one with policy.make_cache")

    def _refuse(self, *args, **kwargs):
        raise NotSupportedError(
            "a CUDA-graph cache keeps its batch fixed (beam search, batch selection and rollback are not served); "
            "build the cache without cuda_graphs for them"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = offload = prefetch = _refuse


class StaticPolicyCache(KVPolicyCache):
    """A :class:`~kvpolicy.cache.KVPolicyCache` of :class:`StaticPolicyLayer` objects, decoded
    through :class:`~kvpolicy.cuda_graphs.GraphedDecoding` (its :attr:`decoding`)."""

    def __init__(self, layers: list[StaticPolicyLayer], policy_name: str = ""):
        super().__init__(layers, policy_name=policy_name)
        from kvpolicy.cuda_graphs import GraphedDecoding

        self.decoding = GraphedDecoding(self)
        self.adopted = False
        self.schedules: list[tuple[RingSchedule, list[StaticPolicyLayer]]] = []
        for layer in layers:
            for schedule, members in self.schedules:
                if schedule is layer.schedule:
                    members.append(layer)
                    break
            else:
                self.schedules.append((layer.schedule, [layer]))

    def adopt(self) -> None:
        """After the prefill: book it and move every layer's tokens into its buffers."""
        for schedule, layers in self.schedules:
            batch, _, _ = layers[0].eager.shape
            schedule.start(layers[0].eager.get_seq_length(), batch, layers[0].eager.device)
            for layer in layers:
                layer.adopt()
        self.adopted = True

    def book_step(self) -> None:
        """After a decode step: book its token, pack what the policy packs, free what leaves."""
        for schedule, layers in self.schedules:
            booking = schedule.book()
            for layer in layers:
                layer.pack(booking)
            schedule.commit(booking)


def build_static_cache(policy, model, specs, max_cache_len: int | None) -> StaticPolicyCache:
    """``policy.make_cache(model, cuda_graphs=True, max_cache_len=...)``: one static layer per
    decoder layer, sharing a :class:`RingSchedule` per retention schedule; refuses what the
    replayed step cannot serve."""
    from kvpolicy import cuda_graphs
    from kvpolicy.layers import model_name

    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
        raise ConfigError("max_cache_len", max_cache_len, "a positive number of tokens: the prompt plus the new tokens")
    name = model_name(model)
    sliding = sorted({s.type for s in specs if s.type != "full_attention"})
    if sliding:
        raise NotSupportedError(
            f"cuda_graphs: {name} has {', '.join(sliding)} layers, whose cache grows and slides by concatenation; "
            "the replayed step serves models whose every layer is full attention. Build the cache without cuda_graphs"
        )
    schedules: dict[tuple, RingSchedule] = {}
    layers = []
    for spec in specs:
        layer_policy = policy.for_layer(spec.index, spec.num_layers)
        eager = layer_policy.new_layer(spec.head_dim, model.config, value_head_dim=spec.value_head_dim)
        keys, values = eager.key_store, eager.value_store
        if not eager.aligned:
            raise NotSupportedError(
                f"cuda_graphs: policy {policy.name!r} retains keys and values differently, so their tokens sit in "
                "different places; the replayed step serves policies whose keys and values keep the same tokens "
                "(e.g. logquant, kivi, streaming). Build the cache without cuda_graphs"
            )
        for store, side in ((keys, "keys"), (values, "values")):
            if store.backend is not None and type(store.backend) is not NativeQuantizer:
                raise NotSupportedError(
                    f"cuda_graphs: {side} are quantized by {type(store.backend).__name__} "
                    f"({store.spec.backend!r}, rotate={store.spec.rotate!r}); the replayed step reads the native "
                    "backend's codes without rotation. Build the cache without cuda_graphs"
                )
        key = (repr(keys.unbound_selector), keys.demote, keys.block, repr(keys.spec))
        if key not in schedules:
            budget = keys.unbound_selector.budget
            slots = budget + keys.block + 1 if budget is not None else max_cache_len + 1
            schedules[key] = RingSchedule(keys, slots, max_cache_len)
        layers.append(StaticPolicyLayer(eager, schedules[key]))
    attention.attach(model)
    cuda_graphs.install(model)
    return StaticPolicyCache(layers, policy_name=policy.name)
