"""``pip install .`` with no extras gives a worker that runs and scores without torch or pandas.

The project's files (tracked, and new ones not ignored) are copied to a scratch folder and
installed, not editable, into a new virtual environment, as a production image would
install them (pip's cache is used when it has the wheels). In that environment torch and
pandas cannot be imported and ``stream_app`` comes from the install, not from this
checkout. Its ``fraudstream worker``, started from a folder outside the checkout, scores a
replay on the bundled broker and the real Redis with the shipped model
(``onnx_models/default``): every transaction once, each record equal to the offline
reference this environment computes (``score-file``'s ``score_table``), so the slim install
is the same worker, not just one that starts.

The lint rule that keeps ``stream_app`` free of these imports is in ``pyproject.toml``
(``tests/stream_app/test_import_rules.py``). The install downloads about 56 MB from PyPI when pip's
cache is cold; the whole test takes about a minute on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stream_app.models.card import load_card
from stream_app.models.scorer import OnnxScorer
from tests.cleanup import issue_prefix
from tests.kafka_fixtures import REDIS_URL, Broker, new_settings
from tests.resilience_helpers import (
    environment_without_settings,
    publish,
    read_records,
    score_records,
    simulated,
    transaction_ids,
    transaction_messages,
)
from training.ops.install_report import copy_project
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "onnx_models" / "default"
WORKER_LOCK = ROOT / "tests" / "locks" / "worker.lock"
INSTALL_TIMEOUT_S = 600
# No labels are published: within the first 7 days every terminal window (which ends 7 days
# before the event, the label delay) is empty offline and online alike, so the reference
# needs no label timing to be exact.
DAYS = 6


@dataclass(frozen=True)
class SlimInstall:
    """A new virtual environment with ``pip install <copy of the checkout>`` done in it."""

    venv: Path
    workdir: Path
    env: dict[str, str]
    install_s: float

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run_python(self, code: str) -> subprocess.CompletedProcess[str]:
        """``code`` run by the environment's interpreter, from outside the checkout."""
        return subprocess.run(
            [self.python, "-c", code],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def slim_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlimInstall]:
    scratch = tmp_path_factory.mktemp("slim")
    project = copy_project(scratch / "project")
    # And the files not yet committed (not ignored): what the rest of the suite imports.
    untracked = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, untracked):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    venv = scratch / "venv"
    workdir = scratch / "work"
    workdir.mkdir()
    # Nothing of this test run's environment may reach the new one.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FRAUDSTREAM_", "REDIS_", "PYTHON", "VIRTUAL_ENV"))
    }
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        # The worker image's pins as constraints: what PyPI serves today cannot change it.
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(WORKER_LOCK),
            str(project),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, f"pip install . failed:\n{done.stdout}\n{done.stderr}"
    yield SlimInstall(venv, workdir, env, round(time.monotonic() - started, 1))


def test_the_install_has_neither_torch_nor_pandas(slim_install: SlimInstall) -> None:
    for module in ("torch", "pandas"):
        done = slim_install.run_python(f"import {module}")
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (module, done)
    where = slim_install.run_python("import stream_app; print(stream_app.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(slim_install.venv), where.stdout
    # The worker's whole import graph loads without them (what `worker` runs, and the CLI).
    loaded = slim_install.run_python(
        "import sys; import stream_app.cli as cli; cli.register_commands(); "
        "import stream_app.worker.app, stream_app.worker.loop; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas'}))"
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded


def test_its_worker_scores_with_the_shipped_model_as_the_reference(
    slim_install: SlimInstall, bundled_broker: Broker, tmp_path: Path
) -> None:
    settings = new_settings(bundled_broker, model_dir=SHIPPED_MODEL)
    frame = simulated(n_customers=40, n_days=DAYS, seed=11)
    messages = transaction_messages(frame, settings)
    reference = score_table(frame, OnnxScorer(SHIPPED_MODEL)).table
    worker = WorkerProcess(
        settings,
        tmp_path / "worker.log",
        command=[str(slim_install.venv / "bin" / "fraudstream"), "worker"],
        cwd=slim_install.workdir,
    )
    with worker:
        worker.start()
        publish(settings, messages)
        ids = transaction_ids(messages)
        records = score_records(read_records(settings, settings.topic_scores, ids=ids))
        assert worker.terminate() == 0, worker.log()

    by_id = {r.transaction_id: r for r in records}
    assert len(records) == len(by_id) == len(reference), (len(records), len(reference))
    expected = [str(t) for t in reference["TRANSACTION_ID"]]
    assert sorted(by_id) == sorted(expected)
    scores = np.array([by_id[t].score for t in expected])
    np.testing.assert_allclose(scores, reference["score"].to_numpy(), rtol=0, atol=1e-5)
    assert [by_id[t].decision.value for t in expected] == list(reference["decision"])
    assert {r.model_version for r in records} == {load_card(SHIPPED_MODEL).version}
    print(f"slim install: {slim_install.install_s} s; {len(records)} transactions scored")


def test_offline_commands_name_their_extra_in_it(slim_install: SlimInstall) -> None:
    """A command that needs what the slim install lacks says which extra to install
    (exit code 2), never a traceback."""
    fraudstream = str(slim_install.venv / "bin" / "fraudstream")
    data = slim_install.workdir / "tx.parquet"
    data.write_bytes(b"not read")
    for argv, extra in (
        (["simulate", "--out", str(data)], "demo"),
        (["train", "--data", str(data), "--out", str(slim_install.workdir / "m")], "train"),
        (["rebuild-state", "--data", str(data)], "demo"),
    ):
        done = subprocess.run(
            [fraudstream, *argv],
            cwd=slim_install.workdir,
            env={
                **environment_without_settings(),
                "FRAUDSTREAM_REDIS_URL": REDIS_URL,
                "FRAUDSTREAM_STATE_KEY_PREFIX": issue_prefix(),
                "FRAUDSTREAM_MODEL_DIR": str(SHIPPED_MODEL),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        said = done.stdout + done.stderr
        assert done.returncode == 2, (argv, said)
        assert f"fraudstream[{extra}]" in said and "Traceback" not in said, (argv, said)
