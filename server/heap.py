"""Keep Python's garbage collector off the objects a server process holds for its whole life.

A full collection walks every tracked container: after start-up that is the model's modules, the
tokenizer, the engine and everything the imports created -- ~50 ms per full collection on the CPU
machines with nothing running, up to ~95 ms with 256 sequences decoding, each one a stall of a
decode step (measured with ``benchmarks/host_overhead.py``'s workloads). ``gc.freeze()`` after the
warm-up moves what is alive then into the permanent generation, which collections skip. vLLM and
SGLang do the same in their engine processes.

Only the processes bitserve owns call it (``bitserve serve`` once it serves, each Ray engine
replica after its warm-up): the offline :class:`~bitserve.llm.LLM` runs inside the user's program,
whose heap is not ours to freeze.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then freeze the survivors; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
