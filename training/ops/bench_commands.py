"""The ``bench`` command of the ``fraudstream`` CLI, and the table it prints.

``stream_app.cli.COMMANDS`` registers it. Only typer is imported at module level; the
command imports :mod:`training.ops.bench` when it runs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer

from training.ops.stream_commands import BrokerChoice
from training.outputs import REPORTS

# 31 days of the default data (~9,600 transactions a day): the customer windows' lookback
# (features.CUSTOMER_LOOKBACK_MS) and a day, after which the state has its steady size.
WARMUP_EVENTS: Final = 300_000

if TYPE_CHECKING:
    from training.ops.bench import BenchResult, Throughput


class GuaranteeChoice(enum.StrEnum):
    """The worker's processing guarantees (``FRAUDSTREAM_PROCESSING_GUARANTEE``)."""

    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


# Targets on this project's reference machine (2 cores shared by broker, Redis, load
# generator and worker). Rates swing ~1.7x between runs there, so the throughput targets
# are ratios to references measured in the same run.
TARGET_P99_MS: Final = 20.0
TARGET_P99_LOAD: Final = 2_000.0
TARGET_VS_NAIVE: Final = 10.0
TARGET_VS_LIMIT: Final = 0.25
# A worker started on a backlog (start-up included) against the same worker already running.
TARGET_COLD_VS_STEADY: Final = 0.85


def cpu_us_per_event(cores: float, events_per_s: float) -> float:
    """CPU time per event in microseconds: steadier than a rate on a shared machine.

    >>> cpu_us_per_event(0.5, 10_000)
    50.0
    """
    return cores / events_per_s * 1e6 if events_per_s > 0 else math.nan


def report_stem(broker: str, guarantee: str, workers: int = 1, redis_cluster: bool = False) -> str:
    """The file name (without suffix) of a bench report: one per broker, guarantee and
    topology.

    >>> report_stem("kafka", "exactly_once")
    'bench-kafka-exactly_once'
    >>> report_stem("kafka", "at_least_once", workers=2, redis_cluster=True)
    'bench-kafka-at_least_once-2workers-redis_cluster'
    """
    stem = f"bench-{broker}-{guarantee}"
    if workers > 1:
        stem += f"-{workers}workers"
    return stem + ("-redis_cluster" if redis_cluster else "")


@dataclass(frozen=True)
class Target:
    """One target, what was measured, and whether it is met (None: not measured)."""

    name: str
    measured: str
    met: bool | None


def targets(result: BenchResult) -> list[Target]:
    """The issue's targets checked against a result."""
    out: list[Target] = []
    at = [x for x in result.latencies if x.offered_per_s == TARGET_P99_LOAD]
    floor = [x for x in result.floor_latencies if x.offered_per_s == TARGET_P99_LOAD]
    beside = f" (relay floor {floor[0].p99_ms:.1f} ms)" if floor else ""
    out.append(
        Target(
            f"p99 <= {TARGET_P99_MS:g} ms at {TARGET_P99_LOAD:,.0f} events/s",
            f"{at[0].p99_ms:.1f} ms{beside}" if at else "not run",
            at[0].p99_ms <= TARGET_P99_MS if at else None,
        )
    )
    if result.naive and result.worker:
        ratio = result.worker.events_per_s / result.naive.events_per_s
        out.append(Target(f">= {TARGET_VS_NAIVE:g}x naive", f"{ratio:.1f}x", ratio >= 10))
    if result.limit and result.worker:
        share = result.worker.events_per_s / result.limit.events_per_s
        out.append(
            Target(f">= {TARGET_VS_LIMIT:.0%} of limit", f"{share:.0%}", share >= TARGET_VS_LIMIT)
        )
    if result.cold and result.worker:
        share = result.cold.events_per_s / result.worker.events_per_s
        out.append(
            Target(
                f"cold drain >= {TARGET_COLD_VS_STEADY:.0%} of the steady rate",
                f"{share:.0%}",
                share >= TARGET_COLD_VS_STEADY,
            )
        )
    return out


def _share(w: Throughput, reference: Throughput | None) -> str:
    return f"{w.events_per_s / reference.events_per_s:.0%}" if reference else "not measured"


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def broker_name(result: BenchResult) -> str:
    """The broker a run used, as the tables name it."""
    if result.settings.get("broker") == "kafka":
        return "Apache Kafka"
    return "bundled broker"


def render_markdown(result: BenchResult) -> str:
    """A run's report: machine, throughput, latency, targets."""
    m = result.machine
    s = result.settings
    lines = [
        f"Measured {result.started_at} by `fraudstream bench --broker "
        f"{s.get('broker', 'bundled')} --guarantee "
        f"{s.get('processing_guarantee', 'at_least_once')}` on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, ONNX Runtime "
        f"{m['onnxruntime']}. Broker ({broker_name(result)}), Redis ({s.get('redis')}), "
        "load generator "
        f"and worker share the cores; load average (1 min) {result.load_average.get('before')} "
        "before, "
        f"{result.load_average.get('after')} after.",
        "",
        f"Model `{result.model_version}`; data: `{result.data}` in event-time order, fraud "
        f"labels 7 days after their frauds; {s.get('partitions')} partitions, batches of up to "
        f"{s.get('batch_size')} events.",
        "",
    ]
    if s.get("worker_src"):
        lines += [f"The worker ran from `{s['worker_src']}` (`--worker-src`).", ""]
    if result.worker is not None:
        lines += [
            "| Path | Events measured | Events/s | CPU (cores) | CPU µs/event | Peak RSS (MiB) "
            "| Redis CPU | Redis µs/event | Broker CPU | Worker ÷ path |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        w = result.worker
        rows = [
            (w, f"worker, {w.name} (after {s.get('warmup_events'):,} events of warm-up)"),
            (result.naive, "naive: Faust agent, 6 Redis round trips + 1 ONNX call per event"),
            (
                result.limit,
                "limit: aiokafka `getmany` + 1 ONNX call per batch, no state or output",
            ),
        ]
        for t, label in rows:
            if t is None:
                continue
            ratio = w.events_per_s / t.events_per_s if t.events_per_s else math.nan
            lines.append(
                f"| {label} | {t.events:,} in {t.seconds:.1f} s | {t.events_per_s:,.0f} | "
                f"{t.cpu_cores:.2f} | {cpu_us_per_event(t.cpu_cores, t.events_per_s):,.1f} | "
                f"{t.peak_rss_mib:,.0f} | {t.redis_cpu_cores:.2f} | "
                f"{cpu_us_per_event(t.redis_cpu_cores, t.events_per_s):,.1f} | "
                f"{t.broker_cpu_cores:.2f} | {ratio:.2f}x |"
            )
        c = result.cold
        if c is not None:
            lines.append(
                f"| cold drain: {w.name} started on a backlog, spawn to last score record | "
                f"{c.events:,} in {c.seconds:.1f} s | {c.events_per_s:,.0f} | "
                f"{c.worker_cpu_s / c.seconds:.2f} | {c.us_per_event(c.worker_cpu_s):,.1f} | "
                f"{c.peak_rss_mib:,.0f} | {c.redis_cpu_s / c.seconds:.2f} | "
                f"{c.us_per_event(c.redis_cpu_s):,.1f} | {c.broker_cpu_s / c.seconds:.2f} | "
                f"{w.events_per_s / c.events_per_s:.2f}x |"
            )
        lines += [
            "",
            f"Meanwhile, Redis used {w.redis_cpu_cores:.2f} cores "
            f"({result.redis.get('script_us_per_event')} µs/event in the state script, "
            f"`INFO commandstats`) and the broker {w.broker_cpu_cores:.2f} cores.",
        ]
        if c is not None:
            lines.append(
                f"Cold drain: {c.events:,} events published with no worker running, then "
                f"{w.name} started on them (topics and a consumer group of their own, the "
                f"same Redis state); its first score record came {c.startup_s:.1f} s after "
                f"the spawn, its last {c.seconds:.1f} s after ({c.scoring_events_per_s:,.0f} "
                "events/s between the two), timed by the score records' own timestamps; "
                "CPU from the spawn, start-up included. Ratios in this run: worker ÷ limit "
                f"{_share(w, result.limit)}, cold drain ÷ worker "
                f"{c.events_per_s / w.events_per_s:.0%}."
            )
        if len(result.partition_split) > 1:
            split = "; ".join(f"{k}: {', '.join(v)}" for k, v in result.partition_split.items())
            lines.append(f"Partition split: {split}.")
        lines.append("")
    if result.latencies:
        floors = {x.offered_per_s: x for x in result.floor_latencies}
        lines += [
            "Latency: event handed to the producer -> its score record held by a consumer, "
            "after 2 s at the same rate that are not measured (fresh topics and clients). "
            "Relay floor: the same offered load through the **relay** reference, which "
            "consumes with the worker's consumer settings and produces each message unchanged "
            "with its producer settings: the two broker hops alone, with no work between them.",
            "",
            "| Offered events/s | Achieved | Events | Scored | p50 ms | p95 ms | p99 ms "
            "| max ms | Relay floor p50 / p99 ms | Worker CPU | Worker µs/event | Load avg |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for x in result.latencies:
            f = floors.get(x.offered_per_s)
            floor = f"{f.p50_ms:.1f} / {f.p99_ms:.1f}" if f else ""
            lines.append(
                f"| {x.offered_per_s:,.0f} | {x.achieved_per_s:,.0f} | {x.events:,} | "
                f"{x.received:,} | {x.p50_ms:.1f} | {x.p95_ms:.1f} | {x.p99_ms:.1f} | "
                f"{x.max_ms:.0f} | {floor} | {x.worker_cpu_cores:.2f} | "
                f"{cpu_us_per_event(x.worker_cpu_cores, x.achieved_per_s):,.0f} | "
                f"{x.load_average:.2f} |"
            )
        lines.append("")
    if result.worker is not None:
        lines += ["| Target | Measured | Met |", "| --- | ---: | :---: |"]
        lines += [f"| {t.name} | {t.measured} | {_mark(t.met)} |" for t in targets(result)]
        lines.append("")
    if result.soak is not None:
        lat = result.soak["latency"]
        lines += [
            f"Soak: {lat['events']:,} events at {lat['offered_per_s']:,.0f}/s; p50 "
            f"{lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms.",
            "",
            "| t (s) | Worker RSS (MiB) | Redis used_memory (MiB) | p99 since last (ms) | Scored |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result.soak["series"]:
            lines.append(
                f"| {row['t_s']:.0f} | {row['rss_mib']:.1f} | {row['redis_used_memory_mib']:.1f}"
                f" | {row['p99_ms']:.1f} | {row['scored']:,} |"
            )
        lines.append("")
    return "\n".join(lines)


def bench_command(
    model_dir: Annotated[
        Path, typer.Option(help="Model directory (or pointer file / symlink) the worker serves.")
    ] = Path("onnx_models/default"),
    data: Annotated[
        Path | None,
        typer.Option(help="Transactions file; default data/tx.parquet, else a simulation."),
    ] = None,
    events: Annotated[int, typer.Option(help="Events the throughput is measured over.")] = 200_000,
    warmup_events: Annotated[
        int,
        typer.Option(
            help="Events processed before the measurement starts (default: 31 days of the "
            "default data, the state at its steady size)."
        ),
    ] = WARMUP_EVENTS,
    load: Annotated[
        list[float] | None,
        typer.Option(help="Offered loads (events/s) for latency; repeat the option."),
    ] = None,
    max_load: Annotated[bool, typer.Option(help="Also offer the measured maximum rate.")] = True,
    load_seconds: Annotated[float, typer.Option(help="Seconds per offered load.")] = 15.0,
    workers: Annotated[int, typer.Option(help="Worker processes sharing the topic.", min=1)] = 1,
    references: Annotated[
        bool, typer.Option(help="Also measure the naive and limit references.")
    ] = True,
    naive_seconds: Annotated[float, typer.Option(help="Seconds the naive reference runs.")] = 30.0,
    cold_events: Annotated[
        int,
        typer.Option(
            help="Backlog of the cold drain (worker started on it, timed from spawn to the "
            "last score record); 0: none.",
            min=0,
        ),
    ] = 300_000,
    worker_src: Annotated[
        Path | None,
        typer.Option(
            help="Run the worker from this source tree (e.g. a git worktree of another "
            "commit); load and references from this one: a before/after on one machine.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    partitions: Annotated[int, typer.Option(help="Partitions of the bench topics.", min=1)] = 4,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="Measure against this Redis (e.g. the shared one); default a redis-server of "
            "the bench's own, which nothing else slows down."
        ),
    ] = None,
    soak: Annotated[
        bool, typer.Option(help="Soak instead: a fixed rate for minutes; RSS and Redis memory.")
    ] = False,
    soak_seconds: Annotated[float, typer.Option(help="Length of the soak.")] = 600.0,
    soak_rate: Annotated[float, typer.Option(help="Events/s during the soak.")] = 2_000.0,
    broker: Annotated[
        BrokerChoice,
        typer.Option(help="bundled (no JVM) or kafka (Apache Kafka, as deployed)."),
    ] = BrokerChoice.BUNDLED,
    guarantee: Annotated[
        GuaranteeChoice,
        typer.Option(help="The worker's processing guarantee (exactly_once: kafka only)."),
    ] = GuaranteeChoice.AT_LEAST_ONCE,
    redis_cluster: Annotated[
        bool,
        typer.Option(help="State on a Redis Cluster of the run's own (3 primaries, 3 replicas)."),
    ] = False,
    latency: Annotated[
        bool, typer.Option(help="Measure latency at the offered loads after the throughput.")
    ] = True,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for the report: bench-BROKER-GUARANTEE[-Nworkers][-redis_cluster].md "
            "and .json (soak.md, soak.json)."
        ),
    ] = REPORTS,
) -> None:
    """End-to-end throughput and latency of the worker against a local broker and Redis.

    Prints a table and writes it (Markdown and JSON) to --out.
    """
    import asyncio
    import signal

    from rich.console import Console

    from stream_app.errors import FraudStreamError
    from training.ops.bench import BenchOptions, BenchRun

    console = Console()
    options = BenchOptions(
        model_dir=model_dir,
        data=data,
        events=events,
        warmup_events=warmup_events,
        loads=tuple(load) if load else (1_000.0, 2_000.0, 5_000.0),
        max_load=max_load,
        load_seconds=load_seconds,
        workers=workers,
        references=references,
        naive_seconds=naive_seconds,
        cold_events=cold_events,
        worker_src=worker_src,
        partitions=partitions,
        redis_url=redis_url,
        soak_seconds=soak_seconds if soak else 0.0,
        soak_rate=soak_rate,
        broker=broker.value,
        guarantee=guarantee.value,
        redis_cluster=redis_cluster,
        latency=latency,
    )

    async def run() -> BenchResult:
        # SIGTERM cancels the run, which then stops its broker, Redis and workers.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await BenchRun(options, console.print).run()

    try:
        result = asyncio.run(run())
    except FraudStreamError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from exc
    except asyncio.CancelledError:
        console.print("[red]stopped[/red] (SIGTERM): nothing written")
        raise typer.Exit(code=143) from None
    table = render_markdown(result)
    console.print(table, markup=False, highlight=False)
    stem = "soak" if soak else report_stem(broker.value, guarantee.value, workers, redis_cluster)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(result.to_json())
    console.print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
