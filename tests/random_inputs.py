"""Random test inputs that are fresh every run and still reproducible.

Each generator is seeded from its key and the run's seed. The run's seed is new for every run and
printed in pytest's header (``random inputs: BITSERVE_TEST_SEED=...``); setting that variable
repeats a run's inputs exactly.
"""

import os
import random
import zlib

import torch

RUN_SEED = int(os.environ.get("BITSERVE_TEST_SEED") or random.SystemRandom().randrange(2 ** 31))


def generator(*key) -> torch.Generator:
    """A CPU generator for the inputs of ``key`` (e.g. the test's name and parameters) in this run."""
    return torch.Generator().manual_seed((zlib.crc32(repr(key).encode()) ^ RUN_SEED) % (2 ** 31))
