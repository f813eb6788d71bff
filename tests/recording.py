"""A reporter that records what the library reports, to assert on it: the reporter is a parameter, not a mock."""

from __future__ import annotations

from stacklock.reporter import Reporter


class RecordingReporter(Reporter):
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...] | tuple[str, str, int, int]] = []

    def step_started(self, name: str) -> None:
        self.calls.append(("started", name))

    def progress(self, step: str, done: int, total: int) -> None:
        self.calls.append(("progress", step, done, total))

    def step_finished(self, name: str) -> None:
        self.calls.append(("finished", name))

    def event(self, message: str) -> None:
        self.calls.append(("event", message))

    @property
    def steps(self) -> list[str]:
        """The steps in the order they started."""
        return [call[1] for call in self.calls if call[0] == "started"]

    def progress_of(self, step: str) -> list[tuple[int, int]]:
        return [(c[2], c[3]) for c in self.calls if c[0] == "progress" and c[1] == step]  # type: ignore[misc]
