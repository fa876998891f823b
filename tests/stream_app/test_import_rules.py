"""The lint rule that keeps the worker slim catches what it should, and only that.

``pyproject.toml`` bans ``training``, ``torch`` and ``pandas`` from ``stream_app/`` with
ruff's TID251 (anywhere in a module) and, for the CLI glue ``stream_app/cli.py``, with
TID253 (module level only: its offline commands import ``training`` inside the functions
that run them, so ``fraudstream worker`` never loads it). ``ruff check .`` enforces it on
the real files; these tests feed ruff small probe modules under the paths the rules are
scoped to, so a config edit that silently unscopes or drops them fails here.
``tests/stream_app/test_slim_install.py`` shows the result: a worker that runs without
torch or pandas.

The serving tests run without torch too: ``tests/ruff.toml`` bans torch and the training
modules that need it everywhere in ``tests/`` except ``tests/training/`` (the tests that train
on purpose), while the serving tests keep the rest of ``training`` (simulator, launchers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BANNED = ("training", "torch", "pandas")
# What tests/ruff.toml bans from the serving tests, and what it must ban at the least.
TESTS_BANNED = tuple(
    tomllib.loads((ROOT / "tests" / "ruff.toml").read_text())["lint"]["flake8-tidy-imports"][
        "banned-api"
    ]
)
NEEDS_TORCH = (
    "torch",
    "training.sequence_model",
    "training.export",
    "training.train",
    "training.gan",
)


def ruff_codes(path: str, source: str) -> list[tuple[int, str]]:
    """(line, code) of each TID diagnostic ruff gives ``source`` as if it were at ``path``."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json",
         "--stdin-filename", path, "-"],
        input=source, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    found = [(d["location"]["row"], d["code"]) for d in json.loads(done.stdout)]
    return sorted((row, code) for row, code in found if code.startswith("TID"))


def probe(module: str) -> str:
    """A module importing ``module`` in every form: plain, dotted, from, and lazily."""
    return (
        f"import {module}\n"  # line 1
        f"import {module}.sub as alias\n"  # line 2
        f"from {module}.sub import name\n"  # line 3
        "\n\n"
        "def lazy() -> None:\n"
        f"    import {module}\n"  # line 7
        f"    from {module} import other\n"  # line 8
    )


@pytest.mark.parametrize("module", BANNED)
@pytest.mark.parametrize("path", ["stream_app/probe.py", "stream_app/console/probe.py"])
def test_the_serving_package_may_not_import_it_anywhere(path: str, module: str) -> None:
    codes = ruff_codes(path, probe(module))
    assert [row for row, code in codes if code == "TID251"] == [1, 2, 3, 7, 8], codes


@pytest.mark.parametrize("module", BANNED)
def test_the_cli_glue_may_import_it_only_inside_a_function(module: str) -> None:
    codes = ruff_codes("stream_app/cli.py", probe(module))
    assert codes == [(1, "TID253"), (2, "TID253"), (3, "TID253")], codes


@pytest.mark.parametrize("path", ["training/probe.py", "tests/training/probe.py"])
def test_offline_code_and_training_tests_may_import_them(path: str) -> None:
    modules = (*BANNED, *TESTS_BANNED)
    assert ruff_codes(path, "".join(probe(m) for m in modules)) == []


def test_the_serving_tests_ban_what_needs_torch() -> None:
    assert set(NEEDS_TORCH) <= set(TESTS_BANNED)


@pytest.mark.parametrize("module", TESTS_BANNED)
@pytest.mark.parametrize("path", ["tests/probe.py", "tests/stream_app/worker/probe.py"])
def test_the_serving_tests_may_not_import_torch_anywhere(path: str, module: str) -> None:
    codes = ruff_codes(path, probe(module))
    assert [row for row, code in codes if code == "TID251"] == [1, 2, 3, 7, 8], codes


@pytest.mark.parametrize("module", ["training.simulator", "training.ops", "pandas"])
def test_the_serving_tests_may_import_the_rest_of_training_and_pandas(module: str) -> None:
    assert ruff_codes("tests/stream_app/probe.py", probe(module)) == []


# Imports every test module outside tests/training/ (and the fixtures conftest re-exports)
# with torch made unimportable, then names any module that loaded torch anyway.
_IMPORT_ALL = """
import importlib, pathlib, sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
root = pathlib.Path.cwd()
for path in sorted((root / "tests").rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[1] != "training":
        importlib.import_module(".".join(p for p in parts if p != "__init__"))
"""


def test_the_serving_tests_import_without_torch() -> None:
    """The lint rule sees direct imports; this sees what they import in turn (a training
    module that starts importing torch, say)."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
