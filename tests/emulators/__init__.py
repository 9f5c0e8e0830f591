"""Local HTTP emulators of the OpenAI, Anthropic and Gemini endpoints, with fault injection."""

from .anthropic_emulator import AnthropicEmulator
from .faults import Fault, Recorder, RequestContext, as_fault, by_attempt, combine, first_attempt, random_faults, sequence
from .gemini_emulator import GeminiEmulator
from .openai_emulator import OpenAIEmulator

EMULATORS = {"openai": OpenAIEmulator, "anthropic": AnthropicEmulator, "gemini": GeminiEmulator}

__all__ = [
    "AnthropicEmulator", "GeminiEmulator", "OpenAIEmulator", "EMULATORS", "Fault", "Recorder", "RequestContext",
    "as_fault", "by_attempt", "combine", "first_attempt", "random_faults", "sequence",
]
