"""Registers ``streaming`` (``policies/streaming.yaml`` beside this module): 4 attention sinks
plus the newest 124 tokens; the rest is evicted."""

from pathlib import Path

from kvpolicy.config import policy_files
from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_policies():
    return policy_files(Path(__file__).parent / "policies")
