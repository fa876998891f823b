"""What each install flavour costs a new user, measured on a fresh virtual environment.

For each flavour (the worker alone, the demo, the training stack) it copies the project's
tracked files to a scratch folder, makes a new virtual environment, and runs the README's
``pip install -e ".[extra]"`` there with pip's cache off, as a first install on a new
machine would. It records the wall time, the environment's size on disk, the number of
distributions installed and whether PyTorch came with it. For the demo flavour it then runs
``fraudstream demo`` in that environment, with output piped, and records how long it took
and its closing figures, which shows the demo needs nothing from the training stack.

Writes ``runs/reports/install.json`` (``--out training/reports/install.json`` for the
README's), which the README's quick start table is
generated from (``python -m training.readme_tables``)::

    python -m training.ops.install_report              # all flavours (downloads several GB)
    python -m training.ops.install_report --flavours serving demo

Figures depend on the network to PyPI and the disk; the report says when and where.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from training.outputs import REPORTS

ROOT: Final = Path(__file__).resolve().parents[2]
REPORT: Final = REPORTS / "install.json"
# flavour -> the extras of `pip install -e ".[...]"` (empty: the worker alone).
FLAVOURS: Final = {"serving": "", "demo": "demo", "train": "train"}
DEMO_TIMEOUT_S: Final = 600
# The demo's closing table rows the report keeps.
SUMMARY_ROWS: Final[tuple[str, ...]] = (
    "transactions scored",
    "precision of alerts",
    "recall of alerts",
)


@dataclass(frozen=True)
class FlavourCost:
    """One flavour's install, as a new user meets it."""

    flavour: str
    command: str
    install_s: float
    disk_bytes: int
    distributions: int
    torch: bool
    measured_at: str


@dataclass(frozen=True)
class DemoRun:
    """``fraudstream demo`` in the demo flavour's fresh environment."""

    command: str
    exit_code: int
    wall_s: float
    summary: dict[str, str]


def copy_project(dest: Path) -> Path:
    """The repository's tracked files only (no data, caches or build output)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (blocks, as ``du`` counts them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_blocks * 512
    return total


def install(flavour: str, project: Path, venv: Path) -> FlavourCost:
    """A new virtual environment with one flavour installed, pip's cache off."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    extras = FLAVOURS[flavour]
    target = f".[{extras}]" if extras else "."
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    started = time.monotonic()
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "-e", target], cwd=project, env=env, check=True
    )
    install_s = time.monotonic() - started
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    names = {d["name"].lower() for d in json.loads(listed)}
    return FlavourCost(
        flavour=flavour,
        command=f'pip install -e "{target}"',
        install_s=round(install_s, 1),
        disk_bytes=disk_bytes(venv),
        distributions=len(names),
        torch="torch" in names,
        measured_at=_now(),
    )


def run_demo(project: Path, venv: Path) -> DemoRun:
    """``fraudstream demo`` in ``venv``, piped, with no Redis or Kafka given to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUDSTREAM_", "REDIS_"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    done = subprocess.run(
        [str(venv / "bin" / "fraudstream"), "demo"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    wall_s = time.monotonic() - started
    cells = (line.strip("│┃ ").split("│") for line in done.stdout.splitlines())
    rows = {c[0].strip(): c[-1].strip() for c in cells if len(c) == 2}
    summary = {name: rows[name] for name in SUMMARY_ROWS if name in rows}
    return DemoRun("fraudstream demo", done.returncode, round(wall_s, 1), summary)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", nargs="+", choices=list(FLAVOURS), default=list(FLAVOURS))
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    costs: list[FlavourCost] = []
    demo: DemoRun | None = None
    with tempfile.TemporaryDirectory(prefix="fraudstream-install-") as scratch:
        project = copy_project(Path(scratch) / "project")
        for flavour in args.flavours:
            venv = Path(scratch) / f"venv-{flavour}"
            cost = install(flavour, project, venv)
            print(json.dumps(asdict(cost)), flush=True)
            costs.append(cost)
            if flavour == "demo":
                demo = run_demo(project, venv)
                print(json.dumps(asdict(demo)), flush=True)
            shutil.rmtree(venv)
    # A partial run keeps the other flavours' earlier measurements (each says when).
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = [f for f in earlier.get("flavours", []) if f["flavour"] not in args.flavours]
    measured = {c.flavour: asdict(c) for c in costs} | {f["flavour"]: f for f in kept}
    if demo is None and earlier.get("demo") is not None:
        demo_entry = earlier["demo"]
    else:
        demo_entry = asdict(demo) if demo is not None else None
    report = {
        "command": f"python -m training.ops.install_report --out {args.out}",
        "measured_at": _now(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, pip cache off, network to PyPI as found",
        "flavours": [measured[f] for f in FLAVOURS if f in measured],
        "demo": demo_entry,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
