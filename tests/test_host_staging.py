"""HostStaging: a step's integer inputs reach the device in one copy, as views with the arrays'
shapes and contents; the buffer grows when a step needs more and is reused after that."""

import numpy as np
import pytest
import torch

from bitserve.engine.host_staging import MIN_CAPACITY, HostStaging


def random_arrays(rng: np.random.Generator, sizes):
    out = []
    for shape in sizes:
        dtype = rng.choice([np.int64, np.int32])
        out.append(rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int64).astype(dtype))
    return out


def check(staging: HostStaging, arrays) -> list[torch.Tensor]:
    got = staging.stage(arrays)
    assert len(got) == len(arrays)
    for a, t in zip(arrays, got):
        assert t.dtype == torch.int64 and t.device.type == staging.device.type
        assert tuple(t.shape) == a.shape
        assert np.array_equal(t.cpu().numpy(), a.astype(np.int64))
    return got


def run(device: torch.device) -> None:
    rng = np.random.default_rng(0)
    staging = HostStaging(device)
    # a decode-like step, a table, empty arrays (no sampled rows), then one that must grow the buffer
    check(staging, random_arrays(rng, [(7,), (7,), (7,), (7, 3), (7,), (8,), (7,)]))
    check(staging, random_arrays(rng, [(0,), (5, 0), (4,)]))
    assert staging.capacity == MIN_CAPACITY
    big = random_arrays(rng, [(MIN_CAPACITY,), (300, 9), (1,)])
    check(staging, big)
    assert staging.capacity == 8192 >= sum(a.size for a in big)
    # reused after growing: the next step's views hold the next step's values
    check(staging, random_arrays(rng, [(10,), (2, 5)]))
    check(staging, [np.full(10, 7, dtype=np.int64)])
    assert check(staging, []) == []


def test_staging_on_cpu():
    staging = HostStaging(torch.device("cpu"))
    assert not staging._host.is_pinned()
    run(torch.device("cpu"))


@pytest.mark.gpu
def test_staging_on_cuda():
    staging = HostStaging(torch.device("cuda"))
    assert staging._host.is_pinned()
    run(torch.device("cuda"))
