"""The README's figures, generated from the report files that hold them.

A generated part of ``README.md`` sits between two markers::

    <!-- BEGIN generated: stream-worker (python -m training.readme_tables) -->
    ...
    <!-- END generated: stream-worker -->

``python -m training.readme_tables`` rewrites every such part from the reports in
``training/reports/``; a test checks that the README equals what this module renders, so a
figure in the README is always the one in its report, and the report names the command
that measured it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from training.ops.bench import BenchResult, Latency, Throughput
from training.ops.bench_commands import (
    TARGET_COLD_VS_STEADY,
    TARGET_P99_LOAD,
    TARGET_P99_MS,
    TARGET_VS_LIMIT,
    cpu_us_per_event,
    report_stem,
)

ROOT: Final = Path(__file__).resolve().parents[1]
README: Final = ROOT / "README.md"
REPORTS: Final = ROOT / "training" / "reports"
# The bench runs the README shows, in its column order: (broker, guarantee).
BENCH_RUNS: Final = (
    ("kafka", "at_least_once"),
    ("kafka", "exactly_once"),
    ("bundled", "at_least_once"),
)
_RUN_NAMES: Final = {
    ("kafka", "at_least_once"): "Apache Kafka, at-least-once",
    ("kafka", "exactly_once"): "Apache Kafka, exactly-once",
    ("bundled", "at_least_once"): "bundled broker, at-least-once",
}


def _load(stem: str, reports: Path) -> BenchResult:
    return BenchResult.from_json((reports / f"{stem}.json").read_text())


def _rate(t: Throughput | None) -> str:
    return f"{t.events_per_s:,.0f}" if t is not None else "-"


def _us(cores: float, rate: float) -> str:
    return f"{cpu_us_per_event(cores, rate):,.0f}"


def _latency(rows: Sequence[Latency], load: float) -> Latency | None:
    found = [x for x in rows if x.offered_per_s == load]
    return found[0] if found else None


def stream_worker(reports: Path = REPORTS) -> str:
    """The throughput, latency and target tables of the bench runs (``BENCH_RUNS``)."""
    runs = [(key, report_stem(*key), _load(report_stem(*key), reports)) for key in BENCH_RUNS]
    lines = [
        "| Run (report) | Worker events/s | Worker CPU µs/event | Redis CPU µs/event "
        "| Limit events/s | Worker ÷ limit | Naive events/s | Worker ÷ naive "
        "| Cold drain events/s (start-up s) | Cold drain ÷ worker |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, stem, r in runs:
        w = r.worker
        if w is None:
            continue
        limit = f"{w.events_per_s / r.limit.events_per_s:.0%}" if r.limit else "-"
        naive = f"{w.events_per_s / r.naive.events_per_s:.0f}x" if r.naive else "-"
        c = r.cold
        cold = f"{c.events_per_s:,.0f} ({c.startup_s:.1f})" if c else "-"
        cold_share = f"{c.events_per_s / w.events_per_s:.0%}" if c else "-"
        lines.append(
            f"| {_RUN_NAMES[key]} (`{stem}.md`) | {_rate(w)} | "
            f"{_us(w.cpu_cores, w.events_per_s)} | {_us(w.redis_cpu_cores, w.events_per_s)} | "
            f"{_rate(r.limit)} | {limit} | {_rate(r.naive)} | {naive} | {cold} | {cold_share} |"
        )
    lines += [
        "",
        "Latency in ms, p50 / p95 / p99, from the event handed to the producer to its score "
        "record held by a consumer (`read_committed` under exactly-once), next to the relay "
        "floor (the same load through a process that only consumes and re-produces, with the "
        "worker's Kafka settings: the two broker hops alone) as p50 / p99:",
        "",
        "| Offered events/s | "
        + " | ".join(f"{_RUN_NAMES[key]} | relay floor" for key, _, _ in runs)
        + " |",
        "| ---: |" + " ---: | ---: |" * len(runs),
    ]
    loads = sorted({x.offered_per_s for _, _, r in runs for x in r.latencies if x.offered_per_s})
    for load in loads:
        cells = []
        for _, _, r in runs:
            x = _latency(r.latencies, load)
            f = _latency(r.floor_latencies, load)
            cells.append(f"{x.p50_ms:.1f} / {x.p95_ms:.1f} / {x.p99_ms:.1f}" if x else "-")
            cells.append(f"{f.p50_ms:.1f} / {f.p99_ms:.1f}" if f else "-")
        lines.append(f"| {load:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", "| Target | Measured | Met |", "| --- | --- | :---: |"]
    for key, stem, r in runs:
        x = _latency(r.latencies, TARGET_P99_LOAD)
        if key == ("kafka", "at_least_once") and x is not None:
            met = "yes" if x.p99_ms <= TARGET_P99_MS else "**no**"
            lines.append(
                f"| p99 <= {TARGET_P99_MS:g} ms at {TARGET_P99_LOAD:,.0f} events/s, "
                f"{_RUN_NAMES[key]} | {x.p99_ms:.1f} ms (`{stem}.md`) | {met} |"
            )
        if r.worker is not None and r.limit is not None:
            share = r.worker.events_per_s / r.limit.events_per_s
            met = "yes" if share >= TARGET_VS_LIMIT else "**no**"
            lines.append(
                f"| one worker >= {TARGET_VS_LIMIT:.0%} of the limit path, {_RUN_NAMES[key]} "
                f"| {share:.0%} (`{stem}.md`) | {met} |"
            )
        if r.worker is not None and r.cold is not None:
            share = r.cold.events_per_s / r.worker.events_per_s
            met = "yes" if share >= TARGET_COLD_VS_STEADY else "**no**"
            lines.append(
                f"| cold drain (start-up included) >= {TARGET_COLD_VS_STEADY:.0%} of the "
                f"worker's steady rate, {_RUN_NAMES[key]} | {share:.0%} (`{stem}.md`) | {met} |"
            )
    return "\n".join(lines)


SCALING_RUNS: Final = (
    (report_stem("kafka", "at_least_once"), "1 worker, one Redis"),
    (
        report_stem("kafka", "at_least_once", workers=2, redis_cluster=True),
        "2 workers, Redis Cluster (3 primaries + 3 replicas)",
    ),
)


def scaling(reports: Path = REPORTS) -> str:
    """One worker on one Redis against two workers on a Redis Cluster (Apache Kafka)."""
    lines = [
        "| Run (report) | Events/s | Workers' CPU µs/event | Redis CPU µs/event "
        "| Broker CPU µs/event | Partitions per worker |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for stem, name in SCALING_RUNS:
        r = _load(stem, reports)
        w = r.worker
        if w is None:
            continue
        split = " / ".join(str(len(v)) for v in r.partition_split.values()) or "all"
        lines.append(
            f"| {name} (`{stem}.md`) | {_rate(w)} | {_us(w.cpu_cores, w.events_per_s)} | "
            f"{_us(w.redis_cpu_cores, w.events_per_s)} | "
            f"{_us(w.broker_cpu_cores, w.events_per_s)} | {split} |"
        )
    return "\n".join(lines)


# What each install flavour is for, in the quick start's table.
_FLAVOUR_USES: Final = {
    "serving": "the worker alone (production)",
    "demo": "`fraudstream demo`, the review console, simulate, replay, score-file",
    "train": "train, evaluate, export",
}


def install(reports: Path = REPORTS) -> str:
    """Each install flavour's time and disk on a fresh environment, and the demo's run."""
    report = json.loads((reports / "install.json").read_text())
    lines = [
        "| Install | For | Time | Disk | PyTorch |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for f in report["flavours"]:
        lines.append(
            f"| `{f['command']}` | {_FLAVOUR_USES[f['flavour']]} | {f['install_s']:.0f} s | "
            f"{f['disk_bytes'] / 1e9:.2f} GB | {'yes' if f['torch'] else 'no'} |"
        )
    demo = report.get("demo")
    lines.append("")
    lines.append(
        f"Measured by `{report['command']}` ({report['measured_at'][:10]}; "
        f"{report['machine']}), "
        "each in a new virtual environment."
    )
    if demo is not None:
        lines[-1] += (
            f" In the demo's environment, `{demo['command']}` then ran for "
            f"{demo['wall_s']:.0f} s (exit code {demo['exit_code']})."
        )
    return "\n".join(lines)


def model_quality(reports: Path = REPORTS) -> str:
    """The benchmark's prequential table, its cost, the published figures and the targets."""
    from training import report

    payload = json.loads((reports / report.BENCHMARK_JSON).read_text())
    pre = payload["prequential"]
    lines = [
        f"`{payload['command']}` ({report.duration(payload['seconds'])} on a 2-core machine "
        f"shared with other jobs), prequential, {len(pre['folds'])} folds, mean ± std; "
        "families and baselines trained on the 7-day training week of each fold unless "
        f"named with more days (full report and protocol: `training/reports/"
        f"{report.BENCHMARK_MD}`):",
        "",
        *report.summary_table(pre["summary"]),
        "",
        *report.published_table("prequential"),
        "",
        "What each costs to train (seconds per fold) and to serve (ONNX Runtime, one thread, "
        "the model call alone):",
        "",
        *report.cost_table(pre["folds"]),
        "",
        f"![Average precision against serving cost](training/reports/{report.COST_PLOT})",
        "",
        "Against the default model's targets (at or above every published figure):",
        "",
        *report.targets_table(pre["summary"]),
    ]
    calibration = json.loads((reports / "calibration.json").read_text())
    lines += [
        "",
        f"Calibration of the shipped model ({calibration['model']}) on its validation period "
        f"{calibration['validation_period']} (`{calibration['command']}`): Brier score "
        f"{calibration['brier']:.5f} against {calibration['brier_of_the_fraud_rate']:.5f} for "
        f"always answering the fraud rate, expected calibration error {calibration['ece']:.4f}"
        " over score bins. Its scores run above the fraud share they stand for (frauds "
        "weigh more in training), so thresholds come from the alert budget and precision, "
        "not from reading a score as a probability (reliability curve: "
        "`training/reports/calibration.md`).",
    ]
    return "\n".join(lines)


def console_settings() -> str:
    """The review console's settings, from their one definition."""
    from stream_app.console.settings import console_settings_table

    return console_settings_table().rstrip("\n")


def console_metrics() -> str:
    """The review console's metrics, from their one definition."""
    from stream_app.console.metrics import console_metrics_table

    return console_metrics_table().rstrip("\n")


def error_policy() -> str:
    """The worker's error policy per stage, from its one definition."""
    from stream_app.worker.error_policy import policy_table

    return policy_table()


SECTIONS: Final[dict[str, Callable[[], str]]] = {
    "stream-worker": stream_worker,
    "scaling": scaling,
    "install": install,
    "model-quality": model_quality,
    "console-settings": console_settings,
    "console-metrics": console_metrics,
    "error-policy": error_policy,
}
_PART: Final = re.compile(
    r"(<!-- BEGIN generated: (?P<name>[a-z-]+) \(python -m training.readme_tables\) -->\n)"
    r".*?"
    r"(<!-- END generated: (?P=name) -->)",
    re.DOTALL,
)


def render(readme: str) -> str:
    """``readme`` with every generated part rendered afresh from the reports."""

    def part(match: re.Match[str]) -> str:
        body = SECTIONS[match["name"]]()
        return f"{match[1]}{body}\n{match[3]}"

    return _PART.sub(part, readme)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the README's generated parts; ``--check`` only says whether they are current."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = README.read_text()
    fresh = render(text)
    if args == ["--check"]:
        return 0 if fresh == text else 1
    README.write_text(fresh)
    print(f"{README.name}: {'updated' if fresh != text else 'already current'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
