"""Peak memory of a call beyond what was allocated before it: on a CUDA device from
``torch.cuda.max_memory_allocated``, on the CPU from torch's profiler, whose memory events
record every allocation and free of torch's CPU allocator (tracemalloc sees only Python's
own allocator, not tensors)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(fn, device: str = "cpu") -> int:
    """The most bytes held at once during ``fn()`` beyond those held before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw events: the aggregated ones fold an allocation into the op that made it.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak
