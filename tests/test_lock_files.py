"""The lock files (tests/locks/, written by ``python -m tests.lockfile``) are whole and current.

Nothing here asks a package index: what PyPI serves today cannot fail these tests. They check
that each lock satisfies ``pyproject.toml``, that it holds exactly the packages its install
reaches with every requirement met by the pinned versions (read from the installed metadata
of those very versions, since ``tests/setup.sh`` installs the dev lock), that the image's
locks pin what the dev lock pins, and that this environment is the dev lock. The tests that
read the installed environment run on the locks' platform only (Linux x86_64, CPython 3.11).
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tests.lockfile import (
    DEV,
    LOCKS,
    PLATFORM_NAME,
    PROJECT,
    ROOT,
    canonical,
    closure,
    marker_environment,
    on_lock_platform,
    parse_lock,
    project_requires,
)

REGENERATE = "run `python -m tests.lockfile`"
on_platform = pytest.mark.skipif(
    not on_lock_platform(), reason=f"the locks are for {PLATFORM_NAME}"
)


def _installed_requires(name: str) -> list[str]:
    return project_requires() if name == PROJECT else list(metadata.requires(name) or [])


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_lock_satisfies_pyproject(name: str) -> None:
    """Each direct requirement of the lock's install is pinned within its specifier.

    Runs anywhere (markers are evaluated for the locks' platform): an edit of pyproject.toml
    that the locks no longer meet fails here until they are regenerated.
    """
    lock = LOCKS[name]
    pins = parse_lock(lock.path)
    env = marker_environment()
    checked = 0
    for text in project_requires():
        req = Requirement(text)
        if canonical(req.name) == PROJECT:
            continue  # demo takes console: the closure test follows that edge
        extras = ("", *lock.extras)
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": e}) for e in extras
        ):
            continue
        pinned = pins.get(canonical(req.name))
        assert pinned is not None, f"{lock.path.name} lacks {req.name}: {REGENERATE}"
        assert req.specifier.contains(pinned, prereleases=True), (
            f"{lock.path.name}: {req.name}=={pinned} breaks `{req}`: {REGENERATE}"
        )
        checked += 1
    base = [text for text in project_requires() if Requirement(text).marker is None]
    assert checked >= len(base) > 0


@on_platform
@pytest.mark.parametrize("name", sorted(LOCKS))
def test_lock_holds_its_whole_closure_and_meets_every_requirement(name: str) -> None:
    """The lock's packages are exactly what its install reaches, each requirement met.

    The requirements are the pinned versions' own (their installed metadata, the versions
    checked equal to the lock first), so the result is the same whatever the index serves.
    """
    lock = LOCKS[name]
    pins = parse_lock(lock.path)
    for package, version in pins.items():
        installed = metadata.version(package)
        assert installed == version, (
            f"{package} {installed} is installed, {lock.path.name} pins {version}: "
            "run `bash tests/setup.sh`"
        )
    graph = closure(lock.extras, _installed_requires)
    missing, extra = graph.packages - set(pins), set(pins) - graph.packages
    assert not missing and not extra, (
        f"{lock.path.name}: lacks {sorted(missing)}, has extra {sorted(extra)}: {REGENERATE}"
    )
    for requirer, req in graph.edges:
        if canonical(req.name) == PROJECT:
            continue  # an extra naming others (demo takes console)
        pinned = pins[canonical(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), (
            f"{lock.path.name}: {req.name}=={pinned} breaks {requirer}'s `{req}`: {REGENERATE}"
        )


@pytest.mark.parametrize("name", sorted(set(LOCKS) - {DEV.name}))
def test_image_lock_pins_what_the_dev_lock_pins(name: str) -> None:
    """The Docker image runs the versions the tests ran with."""
    image, dev = parse_lock(LOCKS[name].path), parse_lock(DEV.path)
    assert set(image) <= set(dev), f"not in the dev lock: {sorted(set(image) - set(dev))}"
    differ = {p: (v, dev[p]) for p, v in image.items() if dev[p] != v}
    assert not differ, f"{name} and dev pin other versions: {differ}: {REGENERATE}"


@on_platform
def test_the_environment_is_the_dev_lock() -> None:
    """tests/setup.sh installed the dev lock: every pin at its version, and pip check is clean."""
    wrong = {}
    for package, version in parse_lock(DEV.path).items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[package] = f"{installed}, locked {version}"
    assert not wrong, f"run `bash tests/setup.sh`: {wrong}"
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_setup_installs_the_dev_lock_and_the_project_without_resolving() -> None:
    setup = (ROOT / "tests" / "setup.sh").read_text(encoding="utf-8")
    assert f"-r {DEV.path.relative_to(ROOT)}" in setup
    project = [line for line in setup.splitlines() if line.rstrip().endswith(" -e .")]
    assert project and all("--no-deps" in line for line in project), project


def test_the_dev_lock_builds_the_project() -> None:
    """setup.sh builds the project without isolation: the lock holds its build requirements."""
    import tomllib

    build = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    pins = parse_lock(DEV.path)
    for text in build["requires"]:
        req = Requirement(text)
        pinned = pins.get(canonical(req.name))
        assert pinned is not None and req.specifier.contains(pinned), f"{req}: {REGENERATE}"
