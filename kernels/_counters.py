"""Arrival counters of split launches whose last program to finish combines the partials of
the others (attention's split-KV decode, the LoRA ops' split-K shrink), in place of a second
launch.

Every launch leaves its counters at zero (the last arrival resets its own), so one buffer zeroed
once serves every later launch. One buffer per (device, stream): launches running at once on two
streams would count each other's arrivals. Under CUDA-graph capture nothing runs, so a buffer
cannot be zeroed then: a capture gets its own, zeroed by a memset node at the start of the
replay; like any temporary of the graph it is free for other use once the replay has passed it.
"""
from __future__ import annotations

import torch

__all__ = ["split_counters"]

_COUNTERS: dict[tuple, torch.Tensor] = {}
_CAPTURE_COUNTERS: list = [None, None]  # [capture id, buffer] of the latest capture
_MIN_COUNTERS = 1 << 12  # 16 KiB: the counters of any default split launch fit
# Streams remembered: a server that makes a stream per request would otherwise grow the table
# forever. Dropping the oldest is safe: the caching allocator hands a freed buffer out again
# only in the order of the stream it was made on, after the launches queued there.
_MAX_COUNTER_STREAMS = 64


def _capture_id(stream: int) -> int:
    from cuda.bindings import runtime as cudart

    err, _status, cid, *_ = cudart.cudaStreamGetCaptureInfo(stream)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaStreamGetCaptureInfo failed: {err}")
    return int(cid)


def _current_stream(device: torch.device) -> int:
    """The handle of the current stream on `device` (0 off CUDA)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least `n` arrival counters for a launch on the current stream."""
    stream = _current_stream(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        cid = _capture_id(stream)
        cur_id, buf = _CAPTURE_COUNTERS
        if cur_id != cid or buf.numel() < n:
            buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
            _CAPTURE_COUNTERS[:] = [cid, buf]
        return buf
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS.pop(key, None)
        while len(_COUNTERS) >= _MAX_COUNTER_STREAMS:
            del _COUNTERS[next(iter(_COUNTERS))]
        _COUNTERS[key] = buf
    return buf
