"""Registers ``streaming``: 4 attention sinks plus the newest 124 tokens; the rest is evicted."""

from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_policies():
    retain = [{"type": "sink", "size": 4}, {"type": "window", "size": 124}]
    return [
        {
            "name": "streaming",
            "description": "StreamingLLM: 4 sink tokens + newest 124 in full precision; older tokens evicted.",
            "keys": {"retain": retain, "demote": "evict"},
            "values": {"retain": retain, "demote": "evict"},
        }
    ]
