"""The integration tests run against a real cluster: tests/tests/python.rs
starts a control plane and agents in network namespaces and runs pytest
here with TESTBUS_CONFIG pointing at it. Alone, they are skipped unless
TESTBUS_INTEGRATION is set (CI sets it; a skip there would be a failure:
python.rs checks that every test passed)."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("TESTBUS_INTEGRATION"):
        skip = pytest.mark.skip(reason="needs a cluster: run by tests/tests/python.rs (TESTBUS_INTEGRATION)")
        for item in items:
            item.add_marker(skip)
