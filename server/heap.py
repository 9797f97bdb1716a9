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


# young-generation threshold once frozen: a decode step of 256 sequences allocates a few thousand
# short-lived objects (chunks, sample results, deltas), so CPython's 700 ran a young collection every
# step or two on the engine thread -- 0.5-1.1 ms a step at 256 streams (a profile on the CPU
# machines: streamed tokens/s 42.2k -> 49.6k with 20,000, the same from 5,000 up to no collection)
YOUNG_THRESHOLD = 20_000


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, freeze the survivors, and collect the young generation
    less often (``YOUNG_THRESHOLD``); returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, gc.get_threshold()[0]), middle, old)
    return gc.get_freeze_count()
