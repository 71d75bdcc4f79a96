"""Decoding from a CUDA graph: the ring schedule (the host's bookkeeping of a fixed-size
buffer), the static cache layers that attend over it, and the capture and replay of a step."""
