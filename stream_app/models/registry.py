"""The models serving now: the champion, an optional shadow challenger, and hot reload.

A model location (``FRAUDSTREAM_MODEL_DIR``, ``FRAUDSTREAM_CHALLENGER_MODEL_DIR``) is a
model directory, a symlink to one, or a *pointer file*: a text file holding the path of a
model directory (relative paths are read from the file's folder). Deploying a model is then
writing a new directory and flipping the pointer (or the symlink) atomically.

:meth:`ModelRegistry.poll` (a background task) notices when what a location points to
changes, loads the candidate in a thread with every serving check of
:class:`~stream_app.models.scorer.OnnxScorer`, and parks it. The scoring loop calls
:meth:`ModelRegistry.activate_pending` between micro-batches, so a batch is scored by one
model from start to end: no event is dropped or scored twice by a swap, and every
ScoreRecord names the version that scored it. A candidate that fails is refused (logged,
``fraudstream_model_reloads_total{outcome="refused"}``) and the current model keeps serving;
the same files are not retried until they change again. A location that cannot even be read
(a pointer file that is not text, a symlink loop, permission denied, a directory removed
mid-read) is refused the same way, once per distinct error, and the watcher goes on: it
never dies, so a valid model deployed later still loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from stream_app.errors import ModelError
from stream_app.metrics import WorkerMetrics
from stream_app.models.card import CARD_FILE, MODEL_FILE, Thresholds
from stream_app.models.scorer import OnnxScorer

log = logging.getLogger(__name__)

Role = Literal["champion", "challenger"]
_MAX_POINTER_BYTES: Final = 4096


def resolve_model_dir(location: Path) -> Path:
    """The model directory a location means: itself, its symlink target, or its pointer's.

    Raises:
        ModelError: the location or the directory it points to does not exist.
    """
    try:
        if location.is_file():
            if location.stat().st_size > _MAX_POINTER_BYTES:
                raise ModelError(f"{location} is a file but too large to be a pointer to a model")
            target = Path(location.read_text(encoding="utf-8").strip())
            if not target.parts:
                raise ModelError(f"pointer file {location} is empty: write a model directory in it")
            location = target if target.is_absolute() else location.parent / target
        directory = location.resolve()
        if not directory.is_dir():
            raise ModelError(f"model directory {directory} does not exist")
    except UnicodeDecodeError:
        raise ModelError(
            f"pointer file {location} is not UTF-8 text: write a model directory's path in it"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:
        # Permission denied, a symlink loop (RuntimeError before Python 3.13, OSError
        # after), a NUL byte in the path, a directory removed while it was read.
        raise ModelError(f"cannot read the model location {location}: {exc}") from None
    return directory


# What identifies the files a location points to: the directory, and each file's inode,
# size and modification time, so an in-place rewrite counts as a change as much as a flip.
Fingerprint = tuple[str, tuple[int, int, int], tuple[int, int, int]]


def fingerprint(location: Path) -> Fingerprint:
    """Identity of the model files behind a location, for change detection."""
    directory = resolve_model_dir(location)
    stats = []
    for name in (CARD_FILE, MODEL_FILE):
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            raise ModelError(f"{directory} has no {name}: not a model directory") from None
        except OSError as exc:  # permission denied, a loop, gone mid-read
            raise ModelError(f"cannot read {directory / name}: {exc}") from None
        stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return (str(directory), stats[0], stats[1])


@dataclass(frozen=True)
class ServingModel:
    """A loaded model with what the scoring loop needs of it."""

    scorer: OnnxScorer
    thresholds: Thresholds
    fingerprint: Fingerprint

    @property
    def version(self) -> str:
        """The version every ScoreRecord it scores carries."""
        return self.scorer.version

    @property
    def sequence_length(self) -> int:
        """``T``, the number of a customer's transactions it reads."""
        return self.scorer.sequence_length

    @property
    def feature_mean(self) -> npt.NDArray[np.float64]:
        """The card's normalisation mean: the "unremarkable" values reasons occlude with."""
        return np.asarray(self.scorer.card.normalisation.mean, dtype=np.float64)

    @property
    def reference_histogram(self) -> list[float]:
        """The card's reference score histogram, for the drift gauge."""
        return list(self.scorer.card.reference_score_histogram.fractions)


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded: settings-derived, the same for every (re)load.

    Args:
        review_threshold: Overrides the champion card's review threshold.
        decline_threshold: Overrides the champion card's decline threshold.
        onnx_threads: ONNX Runtime intra-op threads.
        max_sequence_length: Longest ``T`` the state keeps; longer models are refused.
    """

    review_threshold: float | None = None
    decline_threshold: float | None = None
    onnx_threads: int = 1
    max_sequence_length: int | None = None


def load_model(location: Path, role: Role, options: ModelOptions) -> ServingModel:
    """Load and check one model (blocking: call it in a thread from async code).

    Raises:
        ModelError: the files are missing, fail a serving check, need a longer history than
            the state keeps, or the threshold overrides contradict the card.
    """
    before = fingerprint(location)
    scorer = OnnxScorer(Path(before[0]), intra_op_threads=options.onnx_threads)
    after = fingerprint(location)
    if after != before:  # flipped while loading: refuse rather than guess which one we read
        raise ModelError(f"{location} changed while it was being loaded; will retry")
    limit = options.max_sequence_length
    if limit is not None and scorer.sequence_length > limit:
        raise ModelError(
            f"model {scorer.version} reads sequences of {scorer.sequence_length} transactions "
            f"but the state keeps {limit}: raise FRAUDSTREAM_STATE_SEQUENCE_LENGTH and restart"
        )
    thresholds = scorer.card.thresholds
    if role == "champion" and (
        options.review_threshold is not None or options.decline_threshold is not None
    ):
        try:
            thresholds = Thresholds(
                review=options.review_threshold
                if options.review_threshold is not None
                else thresholds.review,
                decline=options.decline_threshold
                if options.decline_threshold is not None
                else thresholds.decline,
                review_rule="FRAUDSTREAM_REVIEW_THRESHOLD"
                if options.review_threshold is not None
                else thresholds.review_rule,
                decline_rule="FRAUDSTREAM_DECLINE_THRESHOLD"
                if options.decline_threshold is not None
                else thresholds.decline_rule,
            )
        except ValueError as exc:
            raise ModelError(
                f"the threshold override contradicts model {scorer.version}'s card: {exc}"
            ) from None
    return ServingModel(scorer=scorer, thresholds=thresholds, fingerprint=after)


class ModelRegistry:
    """The champion and challenger, their reloads, and the ``model_info`` metric.

    Args:
        champion_location: Where the champion comes from (see :func:`resolve_model_dir`).
        challenger_location: Where the shadow challenger comes from, if any.
        options: How models are loaded.
        metrics: Where loads, refusals and the serving versions are recorded.
    """

    def __init__(
        self,
        champion_location: Path,
        challenger_location: Path | None,
        options: ModelOptions,
        metrics: WorkerMetrics,
    ) -> None:
        self.locations: dict[Role, Path | None] = {
            "champion": champion_location,
            "challenger": challenger_location,
        }
        self.options = options
        self.metrics = metrics
        self.serving: dict[Role, ServingModel | None] = {"champion": None, "challenger": None}
        self._pending: dict[Role, ServingModel] = {}
        self._refused: dict[Role, Fingerprint | None] = {"champion": None, "challenger": None}
        # The last error reading each location, so a lasting one is refused once.
        self._failed: dict[Role, str | None] = {"champion": None, "challenger": None}

    @property
    def champion(self) -> ServingModel:
        """The model whose scores are published and decided on."""
        model = self.serving["champion"]
        if model is None:
            raise ModelError("no champion model loaded: call load_initial() first")
        return model

    @property
    def challenger(self) -> ServingModel | None:
        """The model scored in shadow, if any."""
        return self.serving["challenger"]

    def load_initial(self) -> None:
        """Load the models at start-up (blocking).

        Raises:
            ModelError: the champion cannot serve; a failing challenger is only refused.
        """
        champion = self.locations["champion"]
        assert champion is not None
        try:
            self._activate("champion", load_model(champion, "champion", self.options))
        except ModelError:
            self.metrics.model_reloads.labels("refused").inc()
            raise
        self.metrics.model_reloads.labels("loaded").inc()
        challenger = self.locations["challenger"]
        if challenger is not None:
            try:
                model = load_model(challenger, "challenger", self.options)
            except ModelError as exc:
                self._refuse("challenger", challenger, exc)
            else:
                self.metrics.model_reloads.labels("loaded").inc()
                self._activate("challenger", model)

    def _activate(self, role: Role, model: ServingModel) -> None:
        previous = self.serving[role]
        if previous is not None:
            self.metrics.model_info.remove(previous.version, role)
        self.serving[role] = model
        self.metrics.model_info.labels(model.version, role).set(1)
        log.info("%s model %s serving from %s", role, model.version, model.fingerprint[0])

    def _refuse(self, role: Role, location: Path, exc: Exception) -> None:
        try:
            self._refused[role] = fingerprint(location)
        except ModelError:
            self._refused[role] = None  # missing files: retry at every poll until they appear
        self.metrics.model_reloads.labels("refused").inc()
        current = self.serving[role]
        keeping = f"; {current.version} keeps serving" if current else ""
        log.error("refused the %s model at %s: %s%s", role, location, exc, keeping)

    def activate_pending(self) -> list[str]:
        """Swap in the models loaded since the last call; call it between micro-batches.

        Returns:
            One line per swap, for the caller to log or show.
        """
        swaps = []
        for role, model in list(self._pending.items()):
            previous = self.serving[role]
            self._activate(role, model)
            old = previous.version if previous else "none"
            swaps.append(f"{role} {old} -> {model.version}")
        self._pending.clear()
        return swaps

    async def poll(self) -> None:
        """Check each location once; load what changed in a thread and park it.

        Never raises (but for cancellation): whatever goes wrong with one location (a
        pointer that is not text, a symlink loop, permission denied, a directory removed
        mid-read, a bug) is logged, counted as a refused reload once per distinct error,
        and the next poll tries again, so a later valid model still loads.
        """
        for role, location in self.locations.items():
            if location is None:
                continue
            try:
                await self._poll_one(role, location)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._unreadable(role, location, exc)

    async def _poll_one(self, role: Role, location: Path) -> None:
        current = self._pending.get(role) or self.serving[role]
        seen = fingerprint(location)  # raises on an unreadable location: see poll()
        self._failed[role] = None
        if (current is not None and seen == current.fingerprint) or seen == self._refused[role]:
            return
        try:
            model = await asyncio.to_thread(load_model, location, role, self.options)
        except Exception as exc:  # ModelError, or anything ONNX Runtime or the OS raised
            self._refuse(role, location, exc)
        else:
            self.metrics.model_reloads.labels("loaded").inc()
            self._refused[role] = None
            self._pending[role] = model
            log.info("%s model %s loaded; it serves from the next batch", role, model.version)

    def _unreadable(self, role: Role, location: Path, exc: BaseException) -> None:
        """A location that could not even be read: refused once per distinct error (a
        pointer left broken for an hour is one refusal, not one per poll)."""
        what = f"{type(exc).__name__}: {exc}"
        if self._failed[role] == what:
            return
        self._failed[role] = what
        self.metrics.model_reloads.labels("refused").inc()
        current = self.serving[role]
        keeping = f"; {current.version} keeps serving" if current else ""
        log.error(
            "refused the %s model at %s: cannot read it (%s)%s; still watching",
            role,
            location,
            exc if isinstance(exc, ModelError) else what,
            keeping,
        )

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Poll every ``interval_s`` seconds until ``stop`` is set.

        The watcher outlives every error (see :meth:`poll`); a failure even outside a
        location's poll is logged with its traceback, counted as a refused reload, and
        the next poll goes on, so a model deployed later still loads.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            if stop.is_set():
                break
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.model_reloads.labels("refused").inc()
                log.exception("the model watcher failed; it goes on watching")
