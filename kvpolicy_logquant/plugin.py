"""Registers ``logquant`` and ``partial_logquant`` (``policies/*.yaml`` beside this module).

LogQuant keeps a log-distributed set of at most ``3W`` tokens of keys and values in full
precision (``W = 42`` fits a budget of 128) and quantizes the rest to 2 bits, group 64
(keys per-channel, values per-token). PartialLogQuant applies log retention to keys only
(``W = 64``: up to 192 key tokens) and a plain window of ``W`` to values, 128 tokens on
average over keys and values.
"""

from pathlib import Path

from kvpolicy.config import policy_files
from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_policies():
    return policy_files(Path(__file__).parent / "policies")
