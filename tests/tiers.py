"""Markers of the test tiers that need more than `make test` installs."""

import os

import pytest

from llamaduo_nb import serving

# a real llama.cpp server (`make test-real-server`, in CI): skipped unless LLAMADUO_REAL_SERVER=1
REAL_SERVER = [
    pytest.mark.real_server,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LLAMADUO_REAL_SERVER") != "1", reason="the real-server tier: make test-real-server"),
    pytest.mark.skipif(not serving.available(), reason="llama-cpp-python[server] is not installed (make test-real-server installs it)"),
]
