"""The probe corpus: a fixed, versioned set of conversations the template probes render.

Every message text is unique and made of plain words, so that a probe can find each one in a render (templates
trim content) and no text looks like a special token. Bump :data:`CORPUS_VERSION` whenever a conversation
changes: probe findings of a lock are only comparable between runs over the same corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The version of :data:`CORPUS`; reported with the probes' coverage.
CORPUS_VERSION = 1

USER_1 = "probe question about the weather"
ASSISTANT_1 = "probe answer about sunshine"
USER_2 = "probe follow up about tomorrow"
SYSTEM = "probe system instruction to be brief"
PREFIX = "probe partial answer that continues"
TOOL_RESULT = "probe tool result sunny and warm"
PART = "probe text part of a typed message"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL: dict[str, Any] = {
    "id": "call_0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}


@dataclass(frozen=True)
class Conversation:
    """One conversation of the corpus; ``contents`` are the texts a render must contain."""

    name: str
    messages: tuple[dict[str, Any], ...]
    contents: tuple[str, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    roles: tuple[str, ...] = field(default=())


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


SINGLE = Conversation("single-user", (_user(USER_1),), (USER_1,))
SYSTEM_USER = Conversation(
    "system-user", ({"role": "system", "content": SYSTEM}, _user(USER_1)), (SYSTEM, USER_1), roles=("system",)
)
#: One assistant turn after the user's: what the turn terminator and prefix probes examine.
ANSWERED = Conversation("answered", (_user(USER_1), _assistant(ASSISTANT_1)), (USER_1, ASSISTANT_1))
MULTI_TURN = Conversation("multi-turn", (*ANSWERED.messages, _user(USER_2)), (USER_1, ASSISTANT_1, USER_2))
ASSISTANT_PREFIX = Conversation("assistant-prefix", (_user(USER_1), _assistant(PREFIX)), (USER_1, PREFIX))
TOOL = Conversation(
    "tool-call",
    (
        _user(USER_1),
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "call_0", "name": "get_weather"},
    ),
    (USER_1, TOOL_RESULT),
    tools=(WEATHER_TOOL,),
    roles=("tool",),
)
PARTS = Conversation(
    "content-parts", ({"role": "user", "content": [{"type": "text", "text": PART}]},), (PART,)
)
EMPTY = Conversation("empty-content", (_user(""),), ())

#: Every conversation the probes render, in order.
CORPUS: tuple[Conversation, ...] = (
    SINGLE,
    SYSTEM_USER,
    ANSWERED,
    MULTI_TURN,
    ASSISTANT_PREFIX,
    TOOL,
    PARTS,
    EMPTY,
)
