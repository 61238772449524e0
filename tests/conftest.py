"""Shared pytest setup for the srdxai test suite."""

import os

# Fail at once, instead of after long retries, if anything tries to reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (deselect with -m 'not slow')")
