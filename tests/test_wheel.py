"""The wheel carries every module of stacklock and the bundled registry: built here, imported from the wheel alone.

Packages are discovered (setup.py's find_packages), never listed; this test is what catches a sub-package or a
registry file that would be left out of the wheel. It builds without network access (``--no-build-isolation``
uses the build requirements installed with the ``dev`` extra) and imports every module in a fresh interpreter
whose only copy of stacklock is the unpacked wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports every stacklock module found in the unpacked wheel, and says where the package and the registry are.
PROBE = """
import importlib, importlib.util, json, pkgutil, sys
import stacklock
from importlib.resources import files
names = sorted(m.name for m in pkgutil.walk_packages(stacklock.__path__, "stacklock."))
for name in names:
    # Importing stacklock.__main__ would run the CLI; finding it is enough.
    (importlib.util.find_spec if name.endswith(".__main__") else importlib.import_module)(name)
registry = files("stacklock._registry") / "registry.toml"
print(json.dumps({"file": stacklock.__file__, "modules": names, "registry": registry.is_file()}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what a source checkout holds, so that neither a stale build/ directory of this
    # checkout nor its caches can put a module into the wheel.
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stacklock", "registry"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=source,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("stacklock-*.whl")
    return path


def _source_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "stacklock").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_the_wheel_holds_every_module_and_the_registry(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    in_wheel = {
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in names
        if name.startswith("stacklock/") and name.endswith(".py")
    }
    assert in_wheel >= _source_modules()
    assert "stacklock/_registry/registry.toml" in names
    assert "stacklock/py.typed" in names
    # Every registry file of the checkout is in the wheel, so the wheel's registry digest is the checkout's.
    registry = {
        f"stacklock/_registry/{p.relative_to(ROOT / 'registry').as_posix()}"
        for p in (ROOT / "registry").rglob("*")
        if p.is_file()
    }
    assert registry <= names


def test_every_module_imports_from_the_unpacked_wheel(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    # -I: isolated mode, so neither the checkout nor the editable install is on sys.path; the environment's
    # site-packages (pydantic, typer...) stay, with the unpacked wheel first.
    probe = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + PROBE
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["file"]).is_relative_to(tmp_path)
    assert set(found["modules"]) >= _source_modules() - {"stacklock"}
    assert found["registry"] is True
