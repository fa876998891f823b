"""Progress display of the commands that train LSTMs (train, evaluate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: rich is imported when the bars are made
    from types import TracebackType

    from rich.console import Console
    from rich.progress import Progress, TaskID

    from training.train import EpochLog


class EpochBars:
    """One rich progress bar per LSTM fit, advanced each epoch with its validation AP."""

    def __init__(self, console: Console, total: int, prefix: str = "") -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = total
        self.prefix = prefix
        self.progress: Progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total}"),
            TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.current: TaskID | None = None
        self.best = 0.0

    def __enter__(self) -> EpochBars:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._finish()
        self.progress.stop()

    def _finish(self) -> None:
        # Fits run one after another: a new bar means the previous fit stopped (early
        # stopping ends before the last epoch), so freeze its clock.
        if self.current is not None:
            self.progress.stop_task(self.current)

    def on_epoch(self, name: str, log: EpochLog) -> None:
        """Advance the bar of ``name`` (with :attr:`prefix`), creating it on its first epoch."""
        label = f"{self.prefix}{name}"
        if label not in self.tasks or log.epoch == 1:
            self._finish()
            self.tasks[label] = self.current = self.progress.add_task(
                label, total=self.total, metric=""
            )
            self.best = 0.0
        self.best = max(self.best, log.valid_average_precision)
        self.progress.update(
            self.tasks[label],
            completed=log.epoch,
            metric=f"valid AP {log.valid_average_precision:.4f} (best {self.best:.4f})",
        )
