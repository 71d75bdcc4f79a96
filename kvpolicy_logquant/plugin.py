"""Registers ``logquant`` and ``partial_logquant``.

LogQuant keeps a log-distributed set of at most ``3W`` tokens of keys and values in full
precision (``W = 42`` fits a budget of 128) and quantizes the rest to 2 bits, group 64
(keys per-channel, values per-token). PartialLogQuant applies log retention to keys only
(``W = 64``: up to 192 key tokens) and a plain window of ``W`` to values, 128 tokens on
average over keys and values.
"""

from kvpolicy.hookspecs import hookimpl

KEY_QUANT = {"backend": "native", "bits": 2, "group_size": 64, "axis": "channel"}
VALUE_QUANT = {"backend": "native", "bits": 2, "group_size": 64, "axis": "token"}


@hookimpl
def kvpolicy_policies():
    return [
        {
            "name": "logquant",
            "description": "LogQuant: log-distributed full-precision tokens (W=42, at most 3W=126), rest 2-bit.",
            "keys": {"retain": [{"type": "log", "window": 42}], "quant": KEY_QUANT},
            "values": {"retain": [{"type": "log", "window": 42}], "quant": VALUE_QUANT},
        },
        {
            "name": "partial_logquant",
            "description": "PartialLogQuant: log retention for keys (W=64), a window of 64 for values; rest 2-bit.",
            "keys": {"retain": [{"type": "log", "window": 64}], "quant": KEY_QUANT},
            "values": {"retain": [{"type": "window", "size": 64}], "quant": VALUE_QUANT},
        },
    ]
