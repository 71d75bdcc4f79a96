"""A transformers ``Cache`` whose layers store tokens the way a policy says.

``KVPolicyCache`` holds one :class:`KVPolicyLayer` per decoder layer. A layer owns a key
store and a value store (see :mod:`kvpolicy.store`) and an executor. On ``update`` it
snapshots the stores, appends the step's tokens (demoting what the selectors drop) and
returns the new keys/values tagged with the snapshot; the ``"kvpolicy"`` attention
function then lets the executor attend over snapshot + new tokens.
"""

from __future__ import annotations

import attrs
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpolicy.cache import attention
from kvpolicy.errors import CacheMismatchError, NotSupportedError
from kvpolicy.executors import AttentionStep, Executor
from kvpolicy.store import TensorStore, aligned
from kvpolicy.store.positions import share_positions
from kvpolicy.store.row_sinks import RowSinks


@attrs.frozen
class MemoryReport:
    """KV bytes held vs a 16-bit cache and vs a ``DynamicCache`` in the cache's own dtype
    (all layers, keys and values)."""

    tokens: int
    bytes_by_region: dict[str, int]
    baseline_16bit_bytes: int
    #: the dtype the cache holds its full-precision tokens in (what a DynamicCache would hold)
    dtype: str = "bfloat16"
    element_size: int = 2
    #: whether any token was quantized or evicted yet (False: everything within the budget)
    demoted: bool = True

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_region.values())

    @property
    def ratio(self) -> float:
        """Held bytes / 16-bit bytes (lower is better; 1.0 for a bf16 DynamicCache)."""
        return self.total_bytes / self.baseline_16bit_bytes if self.baseline_16bit_bytes else 0.0

    @property
    def dynamic_cache_bytes(self) -> int:
        """What a ``DynamicCache`` in :attr:`dtype` holds for the same tokens."""
        return self.baseline_16bit_bytes * self.element_size // 2

    def summary(self) -> str:
        held, base = self.total_bytes, self.dynamic_cache_bytes
        if not base:
            return "KV cache: empty"
        factor, word = (base / held, "smaller") if held <= base else (held / base, "larger")
        line = (
            f"KV cache: {held / 2**20:.2f} MiB for {self.tokens} tokens; a DynamicCache in {self.dtype} "
            f"holds {base / 2**20:.2f} MiB: {factor:.2f}x {word}"
        )
        window = self.bytes_by_region.get("sliding_window", 0)
        if window:
            line += (
                f"; its sliding-window layers hold {window / 2**20:.2f} MiB of it in full precision, "
                "as DynamicCache's do"
            )
        if not self.demoted:
            line += " (nothing quantized or evicted yet: every token is within the policy's full-precision budget)"
        return line


class KVPolicyLayer(CacheLayerMixin):
    """One decoder layer's cache: a key store, a value store and the executor that reads them,
    and, in a cache built for CUDA graphs, the buffers its replayed decode steps run on
    (:attr:`ring`, a :class:`~kvpolicy.graphs.static_cache.RingBuffers`)."""

    is_sliding = False
    supports_early_init = False

    def __init__(self, key_store: TensorStore, value_store: TensorStore, executor: Executor, config=None):
        super().__init__()
        self.key_store = key_store
        self.value_store = value_store
        self.executor = executor
        self._config = config
        self._awaiting_attention = False
        # attention sinks kept on both sides are placed per row in a left-padded batch
        self.sinks = min(key_store.selector.sinks, value_store.selector.sinks)
        self.row_sinks: RowSinks | None = None
        # equal selectors, demotion and blocks: both sides book on one Positions (a cache then
        # shares it with the other layers of its schedule)
        share_positions((key_store, value_store))
        self.aligned = aligned(key_store, value_store)
        #: the CUDA-graph buffers (set by ``make_cache(model, cuda_graphs=...)``); while they are in
        #: use they hold this layer's tokens and serve its one-token steps
        self.ring = None

    @property
    def in_ring(self) -> bool:
        """Whether the tokens are in the CUDA-graph buffers (the stores keep only the bookkeeping)."""
        return self.ring is not None and self.ring.in_use

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.shape = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        self.value_head_dim = value_states.shape[3]
        self.is_initialized = True

    @torch.compiler.disable  # the stores' bookkeeping runs eagerly under torch.compile
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``[B, H, q, D]`` keys/values; return them tagged for the ``"kvpolicy"`` attention."""
        if self.in_ring:
            return self.ring.update(key_states, value_states)
        if self._config is not None and not attention.is_attached(self._config):
            raise RuntimeError(
                "this kvpolicy cache needs the model's attention set to 'kvpolicy' "
                f"(it is {self._config._attn_implementation!r}); build the cache with "
                "policy.make_cache(model) or call kvpolicy.attach(model) first"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_matches(key_states)
        prefill = self.key_store.length == 0
        step = AttentionStep(
            keys=self.key_store.view(),
            values=self.value_store.view(),
            new_keys=key_states,
            new_values=value_states,
            past_length=self.key_store.length,
            row_sinks=self.row_sinks,
            after_prefill=(lambda mask: self._place_row_sinks(mask, key_states, value_states))
            if prefill and self.sinks
            else None,
            aligned=self.aligned,
            lossless=self.is_croppable,
        )
        self.key_store.append(key_states)
        self.value_store.append(value_states)
        # a model's forward must hand these tensors to the attention function (checked after it)
        self._awaiting_attention = True
        return attention.tag(key_states, step, self.executor, self._attended), attention.tag(value_states, step, None)

    def _attended(self) -> None:
        self._awaiting_attention = False

    def _place_row_sinks(self, prefill_mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """After a left-padded prefill: each row's first real tokens become its sinks."""
        self.row_sinks = RowSinks.from_prefill_mask(prefill_mask, self.sinks)
        if self.row_sinks is not None:
            self.row_sinks.place(self.key_store, keys)
            self.row_sinks.place(self.value_store, values)

    def _check_matches(self, key_states: torch.Tensor) -> None:
        got = (key_states.dtype, key_states.device, (key_states.shape[0], key_states.shape[1], key_states.shape[3]))
        held = (self.dtype, self.device, self.shape)
        if got != held:
            raise CacheMismatchError(
                f"this cache layer holds {held[0]} tensors on {held[1]} with (batch, kv_heads, head_dim)={held[2]}; "
                f"got {got[0]} on {got[1]} with {got[2]}. A cache serves one model, dtype, device and batch: "
                "build a new one with policy.make_cache(model), or reorder it with the cache's batch methods"
            )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the mask spans every position seen; the executor picks the columns it keeps
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.ring.schedule.length if self.in_ring else self.key_store.length

    def held_tokens(self) -> int:
        """Tokens a ``DynamicCache`` layer would hold for what this layer has seen."""
        return self.get_seq_length()

    @property
    def demoted(self) -> bool:
        """Whether the policy quantized or evicted any token of this layer yet."""
        if self.in_ring:
            return self.ring.schedule.demoted
        return self.key_store.demoted or self.value_store.demoted

    def get_max_length(self) -> int:
        limit = None if self.ring is None else self.ring.schedule.max_cache_len
        return -1 if limit is None else limit

    def reset(self) -> None:
        if self.ring is not None:
            self.ring.free()
        self._awaiting_attention = False
        self.key_store.reset()
        self.value_store.reset()
        self.executor.reset()
        self.row_sinks = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        self._refuse_in_ring("a batch method")
        self.key_store.map_batch(fn)
        self.value_store.map_batch(fn)
        if self.row_sinks is not None:
            self.row_sinks = self.row_sinks.map_batch(fn)
        if self.is_initialized:  # the batch size may change (repeat, select)
            rows = fn(torch.empty(self.shape[0], 1)).shape[0]
            self.shape = (rows, *self.shape[1:])

    def concat_batch(self, others: list[KVPolicyLayer]) -> None:
        """Take the rows of ``others`` (layers of caches of the same policy that saw prompts of
        the same length, unpadded) after this layer's; see :meth:`KVPolicyCache.concat_batch`."""
        for layer in (self, *others):
            if layer.row_sinks is not None:
                raise NotSupportedError(
                    "concat_batch joins unpadded rows; a left-padded prefill placed per-row attention sinks"
                )
            if not layer.is_initialized:
                raise ValueError("concat_batch joins layers that have seen a prefill")
            layer._refuse_in_ring("concat_batch")
        for other in others:
            if (other.dtype, other.device, other.shape[1:]) != (self.dtype, self.device, self.shape[1:]):
                raise CacheMismatchError(
                    f"concat_batch: a layer holds {other.dtype} on {other.device} with (kv_heads, head_dim)="
                    f"{other.shape[1:]}, this one {self.dtype} on {self.device} with {self.shape[1:]}"
                )
        rows = self.shape[0] + sum(other.shape[0] for other in others)
        self.key_store.concat_batch([other.key_store for other in others])
        self.value_store.concat_batch([other.value_store for other in others])
        self.shape = (rows, *self.shape[1:])
        self.executor.reset()  # its memos hold this layer's old rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    @property
    def is_croppable(self) -> bool:
        """Only a policy that never demotes (every token kept, like ``full``) can roll back exactly."""
        return self.key_store.selector.budget is None and self.value_store.selector.budget is None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (assisted decoding's rollback)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number, the count of newest tokens to remove")
        if not tokens_to_remove or not self.is_initialized:
            return
        self._refuse_in_ring("crop")
        if not self.is_croppable:
            raise NotSupportedError(
                "crop/rollback is not supported by this policy: it demotes tokens (quantizes or evicts them) "
                "and which tokens it keeps depends on the length, so a rollback cannot restore the cache it had. "
                "Assisted and prompt-lookup decoding need a croppable cache: use the 'full' policy or DynamicCache"
            )
        self.key_store.crop(-tokens_to_remove)
        self.value_store.crop(-tokens_to_remove)

    def _refuse_in_ring(self, what: str) -> None:
        if self.in_ring:
            raise RuntimeError(
                f"{what} on a layer whose tokens are in its CUDA-graph buffers: the cache hands them back first"
            )

    def offload(self):
        raise NotSupportedError("offloading is not supported by kvpolicy caches")

    def prefetch(self):
        raise NotSupportedError("offloading is not supported by kvpolicy caches")

    def nbytes(self) -> dict[str, int]:
        """Bytes by region: both stores' and what the executor keeps between steps (rotation
        matrices, shared between layers, are counted once by the cache)."""
        out: dict[str, int] = {"executor": self.executor.nbytes()}
        buffers = self.ring.nbytes() if self.ring is not None else {}
        for part in (self.key_store.nbytes(), self.value_store.nbytes(), buffers):
            for region, n in part.items():
                out[region] = out.get(region, 0) + n
        return out

    def rotations(self) -> list[torch.Tensor]:
        held = self.ring.rotations() if self.ring is not None else []
        return self.key_store.rotations() + self.value_store.rotations() + held

    def stores(self) -> tuple[TensorStore, TensorStore]:
        """The key store and the value store (their positions may be shared with other layers')."""
        return self.key_store, self.value_store


class KVPolicyCache(Cache):
    """A transformers ``Cache`` built from a :class:`~kvpolicy.policy.Policy`: one layer per
    decoder layer, a :class:`KVPolicyLayer` for full attention and, in a hybrid model, a
    :class:`~kvpolicy.cache.sliding.SlidingWindowLayer` for each sliding-window layer."""

    def __init__(self, layers: list, policy_name: str = ""):
        super().__init__(layers=layers)
        self.policy_name = policy_name
        # one bookkeeping object per retention schedule, whichever layers and sides use it
        share_positions(_stores(layers))

    def expect_attention(self) -> None:
        """Forget updates made outside a forward: :meth:`check_attended` after the next forward
        covers that forward's updates only."""
        for layer in self.layers:
            layer._awaiting_attention = False

    def check_attended(self, model_type: str = "this model") -> None:
        """Raise :class:`NotSupportedError` if a layer's update of the last forward never reached the
        ``"kvpolicy"`` attention function (the model transformed the cache's output first, so it
        attended something the cache did not hold). Called after every forward of a model that
        ``make_cache`` attached (see :func:`kvpolicy.cache.attention.attach`)."""
        missed = [i for i, layer in enumerate(self.layers) if getattr(layer, "_awaiting_attention", False)]
        self.expect_attention()
        if missed:
            raise NotSupportedError(
                f"the keys and values that this cache's layers {missed[:4]} returned never reached the 'kvpolicy' "
                f"attention function: {model_type} transforms them between its cache and its attention (as "
                "multi-head latent attention does, expanding cached latents), so a kvpolicy cache cannot serve it; "
                "use DynamicCache"
            )

    def concat_batch(self, others: list[KVPolicyCache]) -> None:
        """Take the rows of ``others`` after this cache's own, layer by layer: caches of the same
        policy and model that prefilled unpadded prompts of one length (groups of rows of one
        batch, see :func:`kvpolicy.generation.prefill`). The rows move: ``others`` hold no
        tensors afterwards, and each layer's are freed before the next layer's are joined."""
        if any(len(other.layers) != len(self.layers) for other in others):
            raise CacheMismatchError("concat_batch joins caches of one model (as many layers)")
        for i, layer in enumerate(self.layers):
            layer.concat_batch([other.layers[i] for other in others])

    def memory(self) -> MemoryReport:
        """True bytes held by every layer (sliding-window layers included), and what a
        16-bit ``DynamicCache`` holds for the same tokens (its sliding layers hold their window)."""
        by_region: dict[str, int] = {}
        baseline = 0
        dtype, demoted = None, False
        rotations: dict[tuple, int] = {}  # one count per matrix, however many stores share it
        positions = {id(store.positions): store.positions for store in _stores(self.layers)}
        if positions:
            by_region["positions"] = sum(p.nbytes() for p in positions.values())
        for layer in self.layers:
            for region, n in layer.nbytes().items():
                by_region[region] = by_region.get(region, 0) + n
            for matrix in getattr(layer, "rotations", list)():
                rotations[(matrix.device, matrix.data_ptr())] = matrix.numel() * matrix.element_size()
            if layer.is_initialized:
                (batch, heads, channels), dtype = _layer_geometry(layer)
                baseline += batch * heads * channels * 2 * layer.held_tokens()
                demoted = demoted or layer.demoted
        if rotations:
            by_region["rotation"] = sum(rotations.values())
        return MemoryReport(
            tokens=self.get_seq_length(),
            bytes_by_region=by_region,
            baseline_16bit_bytes=baseline,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16",
            element_size=dtype.itemsize if dtype is not None else 2,
            demoted=demoted,
        )


def _stores(layers: list) -> list[TensorStore]:
    """Every token store of ``layers`` (sliding-window layers have none)."""
    return [store for layer in layers for store in getattr(layer, "stores", tuple)()]


def _layer_geometry(layer) -> tuple[tuple[int, int, int], torch.dtype]:
    """``((batch, kv_heads, key and value channels of a token), dtype)`` of an initialized
    layer of any kind (channels: ``2 * head_dim`` unless values have their own head size)."""
    if hasattr(layer, "value_head_dim"):  # a KVPolicyLayer
        batch, heads, head_dim = layer.shape
        return (batch, heads, head_dim + layer.value_head_dim), layer.dtype
    batch, heads, _, head_dim = layer.keys.shape
    return (batch, heads, head_dim + layer.values.shape[-1]), layer.keys.dtype


def attention_layout(model) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder-only model, or a clear refusal
    (see :func:`kvpolicy.cache.layers.model_layers` for every layer's type and window)."""
    from kvpolicy.cache.layers import model_layers

    specs = model_layers(model)
    return len(specs), specs[0].kv_heads, specs[0].head_dim
