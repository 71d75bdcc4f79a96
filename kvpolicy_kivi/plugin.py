"""Registers ``kivi`` and ``sink_kivi``.

KIVI keeps the newest ``R = 128`` tokens (the residual) in full precision and quantizes the
rest to 2 bits with group 32: keys per-channel, values per-token. ``sink_kivi`` also keeps
the first 4 tokens (attention sinks), with a window of 124 to stay at 128.
"""

from kvpolicy.hookspecs import hookimpl

KEY_QUANT = {"backend": "native", "bits": 2, "group_size": 32, "axis": "channel"}
VALUE_QUANT = {"backend": "native", "bits": 2, "group_size": 32, "axis": "token"}


@hookimpl
def kvpolicy_policies():
    window = [{"type": "window", "size": 128}]
    sink_window = [{"type": "sink", "size": 4}, {"type": "window", "size": 124}]
    return [
        {
            "name": "kivi",
            "description": "KIVI: newest 128 tokens in full precision, rest 2-bit (K per-channel, V per-token).",
            "keys": {"retain": window, "quant": KEY_QUANT},
            "values": {"retain": window, "quant": VALUE_QUANT},
        },
        {
            "name": "sink_kivi",
            "description": "KIVI plus 4 attention-sink tokens kept in full precision (window 124).",
            "keys": {"retain": sink_window, "quant": KEY_QUANT},
            "values": {"retain": sink_window, "quant": VALUE_QUANT},
        },
    ]
