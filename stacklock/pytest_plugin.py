"""The pytest plugin (entry point ``pytest11``): verify a locked stack inside a test suite, one test per smoke prompt.

Two ways in:

- ``pytest --stacklock path/to/llmstack.lock``: the lock file is collected like a test module, and each of its
  smoke prompts becomes a test item that passes when that prompt reproduces.
- In a test module, the ``stacklock`` marker and fixture::

      @pytest.mark.stacklock("llmstack.lock", tolerance=0.5)
      def test_stack(stacklock):
          stacklock.assert_reproduced()

  The test runs once per smoke prompt of the lock (its id is the prompt's name); ``stacklock.result`` is that
  prompt's stage-by-stage result and ``stacklock.report`` the whole verification. Without the marker, the
  fixture is a :class:`StacklockHelper` whose ``verify(path)`` returns a report.

The engine runs once per lock and tolerance in a test session, whatever the number of items. Importing this
module is cheap (every pytest session where stacklock is installed loads it); stacklock's own modules are
imported only when a stack is verified. Errors are the library's exception tree: a missing engine fails the
test with the one-line message, never a traceback into stacklock.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from stacklock.verify.compare import SmokeResult, VerifyReport

LOCK_NAME = "llmstack.lock"
MARKER = "stacklock"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stacklock", "verify locked LLM stacks")
    group.addoption(
        "--stacklock",
        action="store_true",
        default=False,
        help=f"collect {LOCK_NAME} files given on the command line: one test per smoke prompt",
    )
    group.addoption(
        "--stacklock-tolerance",
        type=float,
        default=None,
        metavar="NATS",
        help="accept a divergence at a near-tie within this logprob gap (as `stacklock verify --tolerance`)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(lock, tolerance=None): verify the locked stack; the test runs once per smoke prompt",
    )


@dataclass
class _Verifications:
    """One verification per (lock, tolerance) in a session."""

    reports: dict[tuple[Path, float | None], VerifyReport | BaseException] = field(default_factory=dict)

    def get(self, lock: Path, tolerance: float | None) -> VerifyReport:
        key = (lock.resolve(), tolerance)
        if key not in self.reports:
            from stacklock.errors import StacklockError  # noqa: PLC0415 - imported only when a stack runs.
            from stacklock.verify.compare import Tolerance  # noqa: PLC0415
            from stacklock.verify.session import verify  # noqa: PLC0415

            try:
                self.reports[key] = verify(
                    key[0], tolerance=None if tolerance is None else Tolerance(margin=tolerance)
                )
            except StacklockError as exc:
                self.reports[key] = exc
        found = self.reports[key]
        if isinstance(found, BaseException):
            pytest.fail(f"stacklock: {found}", pytrace=False)
        return found


_STASH = pytest.StashKey[_Verifications]()


def _verifications(config: pytest.Config) -> _Verifications:
    if _STASH not in config.stash:
        config.stash[_STASH] = _Verifications()
    return config.stash[_STASH]


def smoke_names(lock: Path) -> list[str]:
    """The smoke prompts of a lock, read without validating it (verification validates)."""
    try:
        data = tomllib.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"stacklock: cannot read {lock}: {exc}") from None
    smoke = data.get("smoke", [])
    return [
        str(entry.get("name", f"smoke-{index}"))
        for index, entry in enumerate(smoke)
        if isinstance(entry, dict)
    ]


def _failure_text(result: SmokeResult) -> str:
    from stacklock.report.verify import render_text  # noqa: PLC0415
    from stacklock.verify.compare import VerifyReport  # noqa: PLC0415

    one = VerifyReport(results=(result,), reproduced=False, tolerated=result.tolerated)
    return render_text(one).rsplit("\n\n", 1)[0]


def _check(result: SmokeResult) -> None:
    from stacklock.verify.compare import is_certified  # noqa: PLC0415

    if result.first_failure is not None or not is_certified(result):
        pytest.fail(_failure_text(result), pytrace=False)


# -- `pytest --stacklock llmstack.lock` ----------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name == LOCK_NAME and parent.config.getoption("stacklock"):
        return LockFile.from_parent(parent, path=file_path)
    return None


class LockFile(pytest.File):
    """A lock file collected as a test module: its smoke prompts are the tests."""

    def collect(self) -> Iterator[SmokeItem]:
        for name in smoke_names(self.path):
            yield SmokeItem.from_parent(self, name=name)


class SmokeItem(pytest.Item):
    """One smoke prompt of a lock; it passes when every stage reproduces the golden."""

    def runtest(self) -> None:
        tolerance = self.config.getoption("stacklock_tolerance")
        report = _verifications(self.config).get(self.path, tolerance)
        result = next((r for r in report.results if r.name == self.name), None)
        if result is None:
            pytest.fail(f"stacklock: no smoke prompt '{self.name}' in {self.path}", pytrace=False)
        _check(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, pytest.fail.Exception):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"stacklock smoke prompt: {self.name}"


# -- the `stacklock` marker and fixture ------------------------------------------------------------------------


def _marker_lock(node: Any) -> tuple[Path, float | None] | None:
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return None
    lock = marker.args[0] if marker.args else marker.kwargs.get("lock", LOCK_NAME)
    path = Path(lock)
    if not path.is_absolute():
        path = Path(node.path).parent / path
    return path, marker.kwargs.get("tolerance")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    found = _marker_lock(metafunc.definition)
    if found is not None and "stacklock" in metafunc.fixturenames:
        names = smoke_names(found[0])
        metafunc.parametrize("stacklock", names, ids=names, indirect=True)


@dataclass(frozen=True)
class SmokeCheck:
    """What the ``stacklock`` fixture gives a marked test: one smoke prompt's result in its lock's report."""

    lock: Path
    report: VerifyReport
    result: SmokeResult

    def assert_reproduced(self) -> None:
        """Fail the test with the stage-by-stage explanation unless the smoke prompt reproduces."""
        _check(self.result)


@dataclass(frozen=True)
class StacklockHelper:
    """What the ``stacklock`` fixture gives an unmarked test."""

    config: pytest.Config

    def verify(self, lock: str | Path, *, tolerance: float | None = None) -> VerifyReport:
        """Verify a lock (once per session and tolerance); a stacklock error fails the test in one line."""
        return _verifications(self.config).get(Path(lock), tolerance)


@pytest.fixture
def stacklock(request: pytest.FixtureRequest) -> SmokeCheck | StacklockHelper:
    found = _marker_lock(request.node)
    if found is None:
        return StacklockHelper(request.config)
    lock, tolerance = found
    report = _verifications(request.config).get(lock, tolerance)
    name = request.param
    result = next((r for r in report.results if r.name == name), None)
    if result is None:
        pytest.fail(f"stacklock: no smoke prompt '{name}' in {lock}", pytrace=False)
    return SmokeCheck(lock, report, result)
