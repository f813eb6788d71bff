"""The one exception tree of stacklock, and the fixed table of exit codes.

Every error a user can cause is a :class:`StacklockError`; the CLI prints it as one line and exits with
its ``exit_code``. Anything else that escapes is a bug and keeps its traceback.

::

    StacklockError                      exit 2 unless stated
    ├── UsageError                      bad command-line usage
    ├── InputError                      a file the user gave us is wrong
    │   ├── ManifestError               llmstack.toml
    │   ├── LockError                   llmstack.lock (unreadable, wrong version)
    │   │   └── NewerLockError          written by a newer stacklock
    │   ├── FileError                   a path that cannot be read or written (directory, permission, disk full)
    │   ├── GGUFError                   a malformed GGUF file (names field and byte offset)
    │   ├── TemplateError               a chat template that fails, escapes or runs away
    │   │   └── RenderLimitError        a render that ran past its time, output or memory bound
    │   ├── RegistryError               a malformed registry rule, template or stack entry
    │   └── SourceError                 a source that cannot be resolved (missing file, bad hf:// URL)
    ├── StaleLockError                  exit 1: the lock no longer matches its inputs
    ├── RuleViolation                   exit 1: error findings stop the lock
    └── EngineError                     exit 3: the engine is missing, incompatible or crashed
        └── NetworkError                exit 3: a remote source or registry could not be reached
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The exit codes of every stacklock command, in one table."""

    OK = 0
    """Success: locked, fresh, reproduced, no error findings."""
    STACK_WRONG = 1
    """The stack is wrong: stale lock, error findings, not reproduced."""
    BAD_INPUT = 2
    """Bad input or usage: a malformed manifest, lock, GGUF, template or command line."""
    UNAVAILABLE = 3
    """The engine or the network is unavailable, incompatible or crashed."""


class StacklockError(Exception):
    """Base of every error a user can cause. The message is one line: what, where, how to fix."""

    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(StacklockError):
    pass


class InputError(StacklockError):
    pass


class ManifestError(InputError):
    pass


class LockError(InputError):
    pass


class NewerLockError(LockError):
    """A lock written by a newer stacklock: readable by neither ``check`` nor ``lock`` (which must not replace it)."""


class FileError(InputError):
    """A path the user gave that cannot be read or written: a directory, no permission, a full disk."""


class GGUFError(InputError):
    pass


class TemplateError(InputError):
    pass


class RenderLimitError(TemplateError):
    """A render that ran past its time, output or memory bound: every other render of that template would too."""


class RegistryError(InputError):
    pass


class SourceError(InputError):
    pass


class StaleLockError(StacklockError):
    exit_code = ExitCode.STACK_WRONG


class RuleViolation(StacklockError):  # noqa: N818 - Named for what it is: a rule the stack violates.
    exit_code = ExitCode.STACK_WRONG


class EngineError(StacklockError):
    exit_code = ExitCode.UNAVAILABLE


class NetworkError(EngineError):
    pass


class NotFoundError(EngineError):
    """A served engine answered 404: what was asked for (a model not pulled) is not there."""
