"""pytest fixtures for the provider emulators.

Enable with ``pytest_plugins = ["tests.emulators.fixtures"]`` in tests/conftest.py.

    def test_x(emulator_factory):
        emu = emulator_factory("openai", reply=lambda ctx: "hi", policy=first_attempt("429"))
        ... ServiceParams(backend="openai", base_url=emu.url, ...) ...
        assert emu.stats.total == 2
"""

from __future__ import annotations

import pytest

from .anthropic_emulator import AnthropicEmulator
from .gemini_emulator import GeminiEmulator
from .openai_emulator import OpenAIEmulator

EMULATORS = {"openai": OpenAIEmulator, "anthropic": AnthropicEmulator, "gemini": GeminiEmulator}


@pytest.fixture
def emulator_factory():
    """make(provider, **options) -> a started emulator, stopped after the test."""
    started = []

    def make(provider: str, **options):
        emu = EMULATORS[provider](**options).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def openai_emulator(emulator_factory):
    return emulator_factory("openai")


@pytest.fixture
def anthropic_emulator(emulator_factory):
    return emulator_factory("anthropic")


@pytest.fixture
def gemini_emulator(emulator_factory):
    return emulator_factory("gemini")
