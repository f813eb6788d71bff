"""Regular expressions from untrusted places (a smoke prompt's ``expect.regex``, a registry rule's ``regex``),
compiled and searched with a bound on time.

Python's ``re`` cannot be interrupted: a pattern such as ``(a|aa)+$`` backtracks for longer than the universe
exists on a few dozen characters, and a manifest or a shared registry may hold one. The maintained ``regex``
package (the same syntax as ``re``) takes a ``timeout`` on every search; it is imported only when a pattern is
used, so commands that use none do not pay for its import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import regex

SEARCH_TIMEOUT_S = 1.0
"""Seconds one search may take: a sane pattern on a smoke prompt's output or a fact needs microseconds."""


class PatternTimeoutError(Exception):
    """A search ran past :data:`SEARCH_TIMEOUT_S`; the message says so in one line."""


def compile_pattern(value: str) -> regex.Pattern[str]:
    """``value`` compiled; ValueError with the reason on one line when it is not a valid pattern."""
    import regex  # noqa: PLC0415 - only stacks and rules that use a pattern pay for the import.

    try:
        return regex.compile(value)
    except (OverflowError, RecursionError) as exc:
        # A repetition count beyond the engine's limit, or nesting beyond the stack.
        raise ValueError(f"invalid regular expression: {exc}") from None
    except regex.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def search_pattern(pattern: regex.Pattern[str], text: str) -> bool:
    """Whether ``pattern`` is found in ``text``; PatternTimeoutError when the search runs past the bound."""
    try:
        return pattern.search(text, timeout=SEARCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise PatternTimeoutError(
            f"the regular expression {pattern.pattern!r} did not finish within {SEARCH_TIMEOUT_S:g} s on "
            f"{len(text)} characters (it backtracks catastrophically); simplify it, e.g. remove nested repetition"
        ) from None
