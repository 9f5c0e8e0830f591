"""Answers from a server (infer.engine: openai, deploy's parity) are cached by the served model's weights, not its
name: a model retrained behind the same served name is asked again (OpenAI emulator, the real SDK)."""

from __future__ import annotations

import pytest

from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.served import answer, server_config

pytestmark = pytest.mark.emulator

PROMPTS = [{"prompt_id": f"p{i}", "instruction": f"question {i}"} for i in range(3)]


def _answers(emu, cache, weights):
    cfg = server_config(emu.url, "smollm2-135m-instruct-closed_qa-4")
    return answer(cfg, cache, PROMPTS, k=2, temperature=0.7, top_p=0.9, max_new_tokens=16, seed=1, use_n=False,
                  desc="test", weights=weights)


def test_a_retrained_adapter_behind_the_same_name_is_asked_again(emulator_factory, tmp_path):
    emu = emulator_factory("openai")
    cache = ResponseCache(tmp_path / "llm.sqlite")
    first = _answers(emu, cache, weights="adapter-content-A")
    assert emu.stats.total == 6 and len(first) == 6
    _answers(emu, cache, weights="adapter-content-A")  # the same weights: the cache answers
    assert emu.stats.total == 6
    _answers(emu, cache, weights="adapter-content-B")  # retrained: the same name, new weights, asked again
    assert emu.stats.total == 12
    _answers(emu, cache, weights=None)  # a model the workbench did not make: cached by its name
    _answers(emu, cache, weights=None)
    assert emu.stats.total == 18
