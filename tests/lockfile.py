"""The lock files: every package each supported install needs, pinned to one version.

- ``tests/locks/dev.lock``: development and CI (``tests/setup.sh``), ``.[demo,train,dev,console]``;
- ``tests/locks/worker.lock``: the Docker image's ``worker`` stage, the project + ``console``;
- ``tests/locks/tools.lock``: the image's ``tools`` stage, the project + ``tools``.

All three come from ONE pip resolution of the dev install (``pip install --dry-run
--ignore-installed --report``), for the platform CI and the image run on: Linux x86_64,
CPython 3.11 (environment markers are evaluated there, so torch's CUDA wheels are in the dev
lock). The worker and tools locks are the parts of that resolution's dependency graph their
extras reach, so a package has the same version in every lock, and the image runs what the
tests ran.

Regenerate them with ``python -m tests.lockfile``: the resolution keeps every version the dev
lock already pins (the lock is a constraint file of it) and resolves only what is new, so
adding a dependency does not move the others; ``--upgrade`` resolves everything afresh to the
newest versions the index serves. ``tests/test_lock_files.py`` checks, without the network,
that the locks satisfy ``pyproject.toml`` and their own packages' requirements, and that the
installed environment is the dev lock.

Why no hashes: pip's report gives the hash of the one file it picked for this platform, so a
lock with it fails for any other wheel of the same version (the image built on ARM64) and the
day a release gains a more specific wheel. Why in ``tests/locks/``: the repository's top level
is fixed, and generated files stay out of the installed packages (``stream_app``,
``training``); the Docker build's context is the repository root, so it reads them there.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "tests" / "locks"
PROJECT = "fraudstream"
# The environment markers the locks are resolved for: CI's machine and the python:3.11-slim
# image (on x86-64). Other markers (kernel release, patch version) take the running values.
PLATFORM: dict[str, str] = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
}
PLATFORM_NAME = "Linux x86_64, CPython 3.11"
# Requires[name] = the requirement strings of that package (its Requires-Dist).
Requires = Callable[[str], Iterable[str]]


@dataclass(frozen=True)
class Lock:
    """One supported install: the project's extras it takes and where its lock lives."""

    name: str
    extras: tuple[str, ...]
    purpose: str

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.lock"

    @property
    def install_target(self) -> str:
        return f".[{','.join(self.extras)}]" if self.extras else "."


DEV = Lock(
    "dev",
    ("demo", "train", "dev", "console"),
    "development and CI: what tests/setup.sh installs and the tests run with",
)
LOCKS: dict[str, Lock] = {
    lock.name: lock
    for lock in (
        DEV,
        # the live service: the worker and the review console (`fraudstream console`) share it
        Lock("worker", ("console",), "the Docker image's `worker` stage (worker and console)"),
        Lock("tools", ("tools",), "the Docker image's `tools` stage (simulate, replay)"),
    )
}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` -> ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _running_environment() -> dict[str, str]:
    return {str(key): str(value) for key, value in default_environment().items()}


def marker_environment() -> dict[str, str]:
    """The marker environment of the locks' platform."""
    return {**_running_environment(), **PLATFORM}


def on_lock_platform() -> bool:
    """True when this interpreter runs on the platform the locks are for."""
    running = _running_environment()
    return all(running[key] == value for key, value in PLATFORM.items())


def project_requires(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's requirements as Requires-Dist strings, extras as ``extra == "x"`` markers."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requires = list(project["dependencies"])
    for extra, texts in project.get("optional-dependencies", {}).items():
        for text in texts:
            req = Requirement(text)
            only = f'extra == "{extra}"'
            req.marker = Marker(only if req.marker is None else f"({req.marker}) and {only}")
            requires.append(str(req))
    return requires


def parse_lock(path: Path) -> dict[str, str]:
    """A lock file's pins: canonical name -> version."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            name, version = text.split("==")
            pins[canonical(name)] = version.strip()
    return pins


@dataclass
class Graph:
    """The packages an install reaches from the project, and which package asked for which.

    ``edges`` holds every requirement met on the way as (requirer, requirement), so a check
    can test each specifier against the pinned versions.
    """

    extras: dict[str, set[str]]
    edges: list[tuple[str, Requirement]]

    @property
    def packages(self) -> set[str]:
        return set(self.extras) - {PROJECT}

    def via(self, name: str) -> list[str]:
        """The packages that require ``name`` (``pyproject.toml`` for the project)."""
        parents = {
            "pyproject.toml" if p == PROJECT else p
            for p, r in self.edges
            if canonical(r.name) == name
        }
        return sorted(parents)


def closure(extras: Iterable[str], requires: Requires) -> Graph:
    """Walk the requirements from the project with ``extras`` on the locks' platform.

    ``requires`` gives a package's Requires-Dist (the pip report's when locking, the installed
    metadata when checking). A package's requirements are followed for each extra it is
    asked for, as pip does (``redis[hiredis]`` brings hiredis).
    """
    env = marker_environment()
    graph = Graph(extras={}, edges=[])
    done: set[tuple[str, str]] = set()
    pending: list[tuple[str, str]] = [(PROJECT, "")] + [(PROJECT, extra) for extra in extras]
    while pending:
        name, extra = pending.pop()
        graph.extras.setdefault(name, set())
        if extra:
            graph.extras[name].add(extra)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        for text in requires(name):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                continue
            graph.edges.append((name, req))
            child = canonical(req.name)
            pending += [(child, "")] + [(child, e) for e in sorted(req.extras)]
    return graph


def render(lock: Lock, graph: Graph, versions: Mapping[str, str]) -> str:
    """The lock file's text: a header, then one pin a line with the packages that need it."""
    header = [
        f"# {lock.name}: {lock.purpose}.",
        f'# pip install "{lock.install_target}" with every package pinned, for {PLATFORM_NAME}.',
        "# Install with `pip install -r` this file, then the project with --no-deps.",
        "# Written by `python -m tests.lockfile` from one pip resolution: do not edit.",
    ]
    lines = [
        f"{name}=={versions[name]}  # via {', '.join(graph.via(name))}"
        for name in sorted(graph.packages)
    ]
    return "\n".join(header + lines) + "\n"


def resolve(upgrade: bool) -> dict[str, tuple[str, list[str]]]:
    """pip's resolution of the dev install: canonical name -> (version, Requires-Dist)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        command += ["--quiet", "--report", str(report)]
        if DEV.path.exists() and not upgrade:
            command += ["--constraint", str(DEV.path)]
        command.append(DEV.install_target)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            hint = "" if upgrade else " (the current pins may conflict: try --upgrade)"
            raise SystemExit(f"pip could not resolve {DEV.install_target}{hint}")
        items = json.loads(report.read_text(encoding="utf-8"))["install"]
    resolved = {}
    for item in items:
        meta = item["metadata"]
        resolved[canonical(meta["name"])] = (meta["version"], list(meta.get("requires_dist") or []))
    return resolved


def write_locks(upgrade: bool) -> list[Path]:
    """Resolve the dev install once and write every lock from it."""
    if not on_lock_platform():
        raise SystemExit(f"the locks are for {PLATFORM_NAME}: regenerate them there")
    resolved = resolve(upgrade)
    versions = {name: version for name, (version, _) in resolved.items()}
    requires_dist = {name: requires for name, (_, requires) in resolved.items()}

    def requires(name: str) -> list[str]:
        return project_requires() if name == PROJECT else requires_dist[name]

    written = []
    for lock in LOCKS.values():
        graph = closure(lock.extras, requires)
        if lock is DEV and graph.packages != set(resolved) - {PROJECT}:
            # The walk must find what pip installs, or the checks would judge another closure.
            odd = graph.packages ^ (set(resolved) - {PROJECT})
            raise SystemExit(f"the dependency walk and pip disagree on {sorted(odd)}")
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.path.write_text(render(lock, graph, versions), encoding="utf-8")
        written.append(lock.path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lockfile", description="Regenerate the lock files."
    )
    parser.add_argument(
        "--upgrade", action="store_true", help="ignore the current pins: newest versions"
    )
    args = parser.parse_args(argv)
    for path in write_locks(args.upgrade):
        sys.stdout.write(f"wrote {path.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
