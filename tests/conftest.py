import os

# transformers' BitNet helpers are torch.compile-decorated; eager is faster for tiny models.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    from random_inputs import RUN_SEED

    os.environ["BITSERVE_TEST_SEED"] = str(RUN_SEED)  # xdist workers and subprocesses draw the same inputs


def pytest_report_header(config):
    return f"random inputs: BITSERVE_TEST_SEED={os.environ['BITSERVE_TEST_SEED']} (set it to repeat this run's)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a shared 2-core machine more
    threads only add contention (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
