"""Errors that name the bad value and what is allowed instead."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class KVPolicyError(Exception):
    """Base class of every error kvpolicy raises on purpose."""


class ConfigError(KVPolicyError, ValueError):
    """A configuration value is wrong: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")


class UnknownNameError(KVPolicyError, KeyError):
    """A registered name (policy, selector, quantizer, executor) does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        close = difflib.get_close_matches(str(name), self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        kinds = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        message = f"unknown {kind} {name!r}.{hint} Registered {kinds}: {', '.join(self.known) or '(none)'}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class UnsupportedModelError(KVPolicyError, ValueError):
    """The model has layers or a cache layout a kvpolicy cache cannot serve."""


class CacheMismatchError(KVPolicyError, ValueError):
    """A cache received tensors of another dtype, device or shape than it holds."""


class NotSupportedError(KVPolicyError, NotImplementedError):
    """A transformers cache operation that this policy cannot perform faithfully."""


class MissingDependencyError(KVPolicyError, ImportError):
    """An optional package is not installed: names it and the extra that installs it."""

    def __init__(self, what: str, package: str, extra: str):
        super().__init__(
            f"{what} needs the package {package!r}, which is not installed; "
            f"install it with: pip install 'kvpolicy[{extra}]'"
        )
