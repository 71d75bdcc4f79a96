"""Registers ``kivi`` and ``sink_kivi`` (``policies/*.yaml`` beside this module).

KIVI keeps the newest ``R = 128`` tokens (the residual) in full precision and quantizes the
rest to 2 bits with group 32: keys per-channel, values per-token. ``sink_kivi`` also keeps
the first 4 tokens (attention sinks), with a window of 124 to stay at 128.
"""

from pathlib import Path

from kvpolicy.config import policy_files
from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_policies():
    return policy_files(Path(__file__).parent / "policies")
