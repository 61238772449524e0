"""Shared pytest setup for the srdxai test suite."""

import os

import pytest
import torch

# Fail at once, instead of after long retries, if anything tries to reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (deselect with -m 'not slow')")
    # the test process keeps freed memory for reuse, as the command line does (glibc would
    # otherwise fault many models' activations in page by page again; docs/metrics.md)
    from srdxai.engine.memory import keep_freed_memory

    keep_freed_memory()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensor operations (the slow oracles): intra-op threads only add
    overhead, a lot on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def float64_default():
    """float64 as the default dtype for one module's models and inputs, and the previous
    default back for the modules after it. Use with ``pytestmark =
    pytest.mark.usefixtures(...)``; a fixture of the module that builds tensors must be
    requested after it (module fixtures run in the order they are asked for)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
