"""The quantizer backend contract: pack and unpack blocks of tokens at ``bits`` with groups along an axis.

A backend turns a full-precision block ``x`` of shape ``[B, H, n, D]`` into a packed
object (the :class:`Packed` protocol) and back. The backends live in
:mod:`kvpolicy.quantizers`: ``native`` (pure torch, :mod:`kvpolicy.quantizers.native`),
``quanto`` and ``hqq``.

* ``axis="token"`` (per-token, values): groups of ``group_size`` channels within a token.
* ``axis="channel"`` (per-channel, keys): groups of ``group_size`` tokens within a channel;
  ``n`` must be a multiple of ``group_size``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import attrs
import torch

from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError


class Packed(Protocol):
    """A packed block of tokens produced by a backend."""

    num_tokens: int

    def dequantize(self) -> torch.Tensor:
        """Full-precision approximation, ``[B, H, n, D]`` in the original dtype."""

    def nbytes(self) -> dict[str, int]:
        """True bytes held, by part (e.g. ``codes``, ``scales``)."""

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
        """Apply ``fn`` to every tensor whose first dimension is the batch."""

    def slice_tokens(self, start: int, stop: int) -> Packed:
        """Tokens ``start:stop`` (multiples of the per-channel group size), sharing storage."""

    def concat_batch(self, others: list[Packed]) -> Packed:
        """This block's rows, then each of ``others``' (blocks of the same tokens and layout)."""

    def dequantize_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Full-precision tokens at ``index`` (int64, on the host), ``[B, H, len(index), D]``;
        reads only what those tokens need where the layout allows."""


#: most tokens in a per-channel group (their demoted tokens wait in staging until it is full)
MAX_CHANNEL_GROUP = 1024


@attrs.frozen
class BackendOption:
    """A parameter a backend takes from ``quant: {options: {NAME: VALUE}}``."""

    default: Any
    #: whether a value is accepted
    accepts: Callable[[Any], bool]
    #: the accepted values, in words (for the error)
    allowed: str
    doc: str = ""


class QuantizerBackend(ABC):
    """Packs blocks of tokens. Stateless; one instance may serve every layer."""

    name: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]]
    #: the options this backend reads from ``quant.options`` (validated when a policy loads)
    options: ClassVar[dict[str, BackendOption]] = {}
    #: the ``quant.rotate`` values it serves: a backend that rotates records the matrix in its
    #: packed blocks and rotates back when it dequantizes (:mod:`kvpolicy.quantizers.rotation`)
    rotations: ClassVar[tuple[str, ...]] = ("none",)

    def option(self, spec: QuantSpec, key: str) -> Any:
        """``spec``'s value of option ``key``, or its default."""
        return spec.options.get(key, self.options[key].default)

    def check(self, spec: QuantSpec, section: str) -> None:
        """Raise :class:`ConfigError` if ``spec`` cannot be served by this backend on any model
        (checked when a policy is loaded, before a model is)."""
        if spec.bits not in self.supported_bits:
            raise ConfigError(
                f"{section}.bits", spec.bits, f"{' | '.join(map(str, self.supported_bits))} for backend {self.name!r}"
            )
        if spec.rotate not in self.rotations:
            raise ConfigError(
                f"{section}.rotate",
                spec.rotate,
                f"{' | '.join(self.rotations)} for backend {self.name!r} (rotated codes are the native backend's)",
            )
        for key, value in spec.options.items():
            if key not in self.options:
                accepted = ", ".join(sorted(self.options)) or "none"
                raise ConfigError(
                    f"{section}.options.{key}", value, f"an option of backend {self.name!r} (its options: {accepted})"
                )
            if not self.options[key].accepts(value):
                raise ConfigError(f"{section}.options.{key}", value, self.options[key].allowed)
        if spec.axis == "channel" and spec.group_size > MAX_CHANNEL_GROUP:
            raise ConfigError(
                f"{section}.group_size",
                spec.group_size,
                f"at most {MAX_CHANNEL_GROUP} tokens per per-channel group (axis: channel): a group waits "
                "in full precision until it is complete, so a larger one would hardly ever be quantized",
            )

    def validate(self, spec: QuantSpec, head_dim: int, section: str) -> None:
        """Raise :class:`ConfigError` if ``spec`` cannot be served for ``head_dim`` (checked by
        ``make_cache``, which knows the model); includes :meth:`check`."""
        self.check(spec, section)
        if spec.axis == "token" and head_dim % spec.group_size:
            raise ConfigError(
                f"{section}.group_size",
                spec.group_size,
                f"a divisor of head_dim={head_dim} (this model's) for per-token groups (axis: token); "
                f"set {section}.group_size to one",
            )

    @abstractmethod
    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> Packed:
        """Pack ``x`` (``[B, H, n, D]``, possibly a view of a longer block: copy what you need);
        for ``axis="channel"``, ``n % group_size == 0``."""

    @abstractmethod
    def concat(self, blocks: list[Packed]) -> Packed:
        """Join packed blocks along the token axis (so a region stays one object)."""
