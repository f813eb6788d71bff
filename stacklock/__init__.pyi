# The package's names for type checkers; __init__.py imports each on first use.
from stacklock.api import check_lock as check_lock
from stacklock.api import check_stack as check_stack
from stacklock.api import diff_locks as diff_locks
from stacklock.api import lock_stack as lock_stack
from stacklock.api import record_goldens as record_goldens
from stacklock.api import verify_stack as verify_stack

__version__: str
__all__ = [
    "__version__",
    "check_lock",
    "check_stack",
    "diff_locks",
    "lock_stack",
    "record_goldens",
    "verify_stack",
]
