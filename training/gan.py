"""A conditional WGAN-GP over fraud *sequences*, and the fidelity of what it generates.

The GAN learns the training period's fraud sequences (``[T, F]`` each, padded in front) and
generates more of them to mix into the LSTM's training data.

* **Model.** Generator and critic are two-hidden-layer MLPs over the flattened sequence,
  trained as a WGAN-GP (gradient penalty 10, Adam 2e-4 with betas (0.5, 0.9), 3 critic steps
  per generator step); with ~500 frauds a week, anything larger only memorises.
* **Space.** Sequences are encoded by :class:`SequenceCodec`: heavy-tailed features (amounts,
  counts, the amount ratio) through ``log1p``, a customer's window features in earlier rows
  as steps from the last row, then standardised per position over the real rows. Two
  features that are functions of others are not generated but derived on decoding
  (``LOG_TX_AMOUNT`` from the amount, ``TX_DURING_NIGHT`` from the hour on the unit circle).
* **Padding.** The condition is the number of real rows ``L`` (one-hot, drawn from the real
  frauds' distribution); the generator's rows in front of the last ``L`` are masked to zero, so
  the GAN only ever generates real rows and padding comes out exactly as the features module
  writes it.
* **Structure.** Decoding rounds counts to integers (customer counts at least 1, since a
  transaction counts itself, and non-decreasing across the 1/7/30-day windows), the weekend
  flag to 0/1, terminal risks to ``frauds / count`` fractions in ``[0, 1]``, amounts to cents,
  and puts the hour back on the unit circle.
* **Fidelity** (:func:`fidelity`): a classifier two-sample test (the held-out AUC of gradient
  boosting telling real from synthetic sequences; 0.5 is ideal) and per-feature
  Kolmogorov-Smirnov statistics over real rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import ks_2samp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs
from torch import nn

from stream_app import features

SequenceArray = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

_I = features.FEATURE_INDEX
_PRESENCE: Final = _I["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]
_LOG_FEATURES: Final = tuple(
    _I[name]
    for name in features.FEATURE_NAMES
    if name.startswith(("CUSTOMER_ID_", "TERMINAL_ID_NB_TX"))
    or name in ("TX_AMOUNT", "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY")
)
_DERIVED: Final = (_I["LOG_TX_AMOUNT"], _I["TX_DURING_NIGHT"])
GENERATED_FEATURES: Final = tuple(i for i in range(features.N_FEATURES) if i not in _DERIVED)
_WINDOWS: Final = features.CUSTOMER_WINDOWS_DAYS
_CUSTOMER_COUNTS: Final = tuple(_I[f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW"] for w in _WINDOWS)
_TERMINAL_COUNTS: Final = tuple(
    _I[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] for w in features.TERMINAL_WINDOWS_DAYS
)
_TERMINAL_RISKS: Final = tuple(
    _I[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] for w in features.TERMINAL_WINDOWS_DAYS
)
_NON_NEGATIVE: Final = tuple(
    _I[name]
    for name in (
        "TX_AMOUNT",
        *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in _WINDOWS),
        "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY",
    )
)
# Customer window features, carried as steps from the sequence's last row.
_DELTA_POSITIONS: Final = [
    GENERATED_FEATURES.index(_I[name])
    for name in features.BASELINE_FEATURES
    if name.startswith("CUSTOMER_ID_")
]
_MAX_LOG_GAP: Final = math.log1p(features.PREVIOUS_TX_CAP_MS / 1000.0)


def present_rows(sequences: SequenceArray) -> npt.NDArray[np.bool_]:
    """``[N, T]``: which rows are real transactions (padding rows count zero transactions)."""
    mask: npt.NDArray[np.bool_] = sequences[:, :, _PRESENCE] > 0
    return mask


class SequenceCodec:
    """Raw feature sequences to the GAN's standardised space and back (see module doc).

    A customer's window features barely move from one of its transactions to the next, so
    the earlier rows carry them as differences from the last row (in ``log1p`` space): the
    generator learns small steps instead of re-inventing the customer in every row. Each
    position is standardised with its own statistics over real rows.
    """

    def __init__(self, sequences: SequenceArray) -> None:
        mask = present_rows(sequences)
        values = _to_deltas(_forward(sequences.astype(np.float64)))
        t, width = values.shape[1:]
        self.mean = np.zeros((t, width))
        self.std = np.ones((t, width))
        for position in range(t):
            rows = values[mask[:, position], position]
            if len(rows) > 1:
                std = rows.std(axis=0)
                self.mean[position] = rows.mean(axis=0)
                self.std[position] = np.where(std > 1e-6, std, 1.0)

    @property
    def width(self) -> int:
        """Number of generated features."""
        return len(GENERATED_FEATURES)

    def encode(self, sequences: SequenceArray) -> SequenceArray:
        """``[N, T, F]`` raw to ``[N, T, width]`` standardised, padding rows zero."""
        mask = present_rows(sequences)
        z = (_to_deltas(_forward(sequences.astype(np.float64))) - self.mean) / self.std
        return (z * mask[:, :, None]).astype(np.float32)

    def decode(self, encoded: SequenceArray, lengths: npt.NDArray[np.int64]) -> SequenceArray:
        """Generated ``[N, T, width]`` back to raw feature sequences with sensible values.

        ``lengths[i]`` is the number of real rows of sequence ``i``; the rows in front of
        them become zero padding.
        """
        n, t, _ = encoded.shape
        values = _from_deltas(encoded.astype(np.float64) * self.std + self.mean)
        raw = np.zeros((n, t, features.N_FEATURES), dtype=np.float64)
        raw[:, :, GENERATED_FEATURES] = values
        raw[:, :, _LOG_FEATURES] = np.expm1(raw[:, :, _LOG_FEATURES])
        _make_consistent(raw)
        mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
        decoded: SequenceArray = (raw * mask[:, :, None]).astype(np.float32)
        return decoded


def _to_deltas(values: FloatArray) -> FloatArray:
    out = values.copy()
    out[:, :-1, _DELTA_POSITIONS] -= values[:, -1:, _DELTA_POSITIONS]
    return out


def _from_deltas(values: FloatArray) -> FloatArray:
    out = values.copy()
    out[:, :-1, _DELTA_POSITIONS] += values[:, -1:, _DELTA_POSITIONS]
    return out


def _forward(raw: FloatArray) -> FloatArray:
    out = raw[..., GENERATED_FEATURES].copy()
    positions = [GENERATED_FEATURES.index(i) for i in _LOG_FEATURES]
    out[..., positions] = np.log1p(np.maximum(out[..., positions], 0.0))
    return out


def _make_consistent(raw: FloatArray) -> None:
    """Round and clip decoded values in place so each row could come from the features."""
    i = _I
    raw[..., _NON_NEGATIVE] = np.maximum(raw[..., _NON_NEGATIVE], 0.0)
    raw[..., i["TX_AMOUNT"]] = np.round(raw[..., i["TX_AMOUNT"]], 2)
    raw[..., i["TX_DURING_WEEKEND"]] = raw[..., i["TX_DURING_WEEKEND"]] >= 0.5
    counts = np.maximum(np.round(raw[..., list(_CUSTOMER_COUNTS)]), 1.0)
    raw[..., list(_CUSTOMER_COUNTS)] = np.maximum.accumulate(counts, axis=-1)
    terminal = np.maximum(np.round(raw[..., list(_TERMINAL_COUNTS)]), 0.0)
    terminal = np.maximum.accumulate(terminal, axis=-1)
    raw[..., list(_TERMINAL_COUNTS)] = terminal
    risk = np.clip(raw[..., list(_TERMINAL_RISKS)], 0.0, 1.0)
    raw[..., list(_TERMINAL_RISKS)] = np.divide(
        np.round(risk * terminal), terminal, out=np.zeros_like(risk), where=terminal > 0
    )
    sin, cos = raw[..., i["TX_HOUR_SIN"]], raw[..., i["TX_HOUR_COS"]]
    norm = np.maximum(np.hypot(sin, cos), 1e-9)
    sin, cos = sin / norm, cos / norm
    raw[..., i["TX_HOUR_SIN"]], raw[..., i["TX_HOUR_COS"]] = sin, cos
    hour = np.floor(np.mod(np.arctan2(sin, cos), 2 * np.pi) / (2 * np.pi) * 24)
    raw[..., i["TX_DURING_NIGHT"]] = hour <= features.NIGHT_LAST_HOUR
    gap = i["LOG_SECONDS_SINCE_PREV_TX"]
    raw[..., gap] = np.clip(raw[..., gap], 0.0, _MAX_LOG_GAP)
    raw[..., i["LOG_TX_AMOUNT"]] = np.log1p(raw[..., i["TX_AMOUNT"]])


@dataclass(frozen=True)
class GanConfig:
    """Shape and schedule of the WGAN-GP."""

    noise_size: int = 32
    hidden_size: int = 256
    generator_steps: int = 2000
    critic_steps: int = 3
    batch_size: int = 128
    learning_rate: float = 2e-4
    gradient_penalty: float = 10.0
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for reports and the model card."""
        return asdict(self)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, n_out),
    )


class SequenceGan:
    """A trained generator of fraud sequences; build it with :func:`train_gan`."""

    def __init__(
        self,
        codec: SequenceCodec,
        generator: nn.Module,
        length_probabilities: FloatArray,
        sequence_length: int,
        config: GanConfig,
        seconds: float,
    ) -> None:
        self.codec = codec
        self.generator = generator.eval()
        self.length_probabilities = length_probabilities
        self.sequence_length = sequence_length
        self.config = config
        self.seconds = seconds

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> SequenceArray:
        """``n`` synthetic fraud sequences in raw feature space ``[n, T, F]``."""
        t = self.sequence_length
        rng = np.random.default_rng(seed)
        lengths = rng.choice(np.arange(1, t + 1), size=n, p=self.length_probabilities)
        noise = torch.from_numpy(rng.standard_normal((n, self.config.noise_size)))
        condition = _one_hot(lengths, t)
        encoded = self.generator(torch.cat([noise.float(), condition], dim=1))
        encoded = encoded.reshape(n, t, self.codec.width) * _mask(lengths, t)
        return self.codec.decode(encoded.numpy(), lengths.astype(np.int64))


def _one_hot(lengths: npt.NDArray[np.int64], t: int) -> torch.Tensor:
    return nn.functional.one_hot(torch.from_numpy(lengths - 1).long(), t).float()


def _mask(lengths: npt.NDArray[np.int64], t: int) -> torch.Tensor:
    mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
    return torch.from_numpy(mask).float()[:, :, None]


def train_gan(frauds: SequenceArray, config: GanConfig) -> SequenceGan:
    """Fit the conditional WGAN-GP to real fraud sequences ``[N, T, F]``.

    Raises:
        ValueError: fewer than 2 fraud sequences to learn from.
    """
    if len(frauds) < 2:
        raise ValueError(f"the GAN needs at least 2 fraud sequences, got {len(frauds)}")
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n, t, _ = frauds.shape
    codec = SequenceCodec(frauds)
    real = torch.from_numpy(codec.encode(frauds)).reshape(n, -1)
    lengths = present_rows(frauds).sum(axis=1).astype(np.int64)
    real_condition = _one_hot(lengths, t)
    width = codec.width * t
    generator = _mlp(config.noise_size + t, config.hidden_size, width)
    critic = _mlp(width + t, config.hidden_size, 1)
    betas = (0.5, 0.9)
    g_opt = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=betas)
    c_opt = torch.optim.Adam(critic.parameters(), lr=config.learning_rate, betas=betas)
    batch = min(config.batch_size, n)

    def fake_batch(index: npt.NDArray[np.int64]) -> torch.Tensor:
        # Lengths of real sequences, so the condition follows the data's distribution.
        noise = torch.randn(len(index), config.noise_size)
        out: torch.Tensor = generator(torch.cat([noise, real_condition[index]], dim=1))
        return (out.reshape(len(index), t, -1) * _mask(lengths[index], t)).reshape(len(index), -1)

    for _ in range(config.generator_steps):
        for _ in range(config.critic_steps):
            index = rng.integers(0, n, batch)
            cond = real_condition[index]
            fake = fake_batch(index).detach()
            x_real = real[index]
            alpha = torch.rand(batch, 1)
            mixed = (alpha * x_real + (1 - alpha) * fake).requires_grad_(True)
            score_mixed = critic(torch.cat([mixed, cond], dim=1))
            (grad,) = torch.autograd.grad(score_mixed.sum(), mixed, create_graph=True)
            penalty = ((grad.norm(2, dim=1) - 1) ** 2).mean()
            loss_c = (
                critic(torch.cat([fake, cond], dim=1)).mean()
                - critic(torch.cat([x_real, cond], dim=1)).mean()
                + config.gradient_penalty * penalty
            )
            c_opt.zero_grad(set_to_none=True)
            loss_c.backward()
            c_opt.step()
        index = rng.integers(0, n, batch)
        loss_g = -critic(torch.cat([fake_batch(index), real_condition[index]], dim=1)).mean()
        g_opt.zero_grad(set_to_none=True)
        loss_g.backward()
        g_opt.step()

    probabilities = np.bincount(lengths - 1, minlength=t) / n
    return SequenceGan(codec, generator, probabilities, t, config, time.perf_counter() - started)


@dataclass(frozen=True)
class Fidelity:
    """How distinguishable synthetic fraud sequences are from held-out real ones."""

    c2st_auc: float
    c2st_auc_real_vs_real: float | None
    ks: dict[str, float]
    n_real: int
    n_synthetic: int

    @property
    def ks_mean(self) -> float:
        """Mean KS statistic over features."""
        return float(np.mean(list(self.ks.values())))

    @property
    def ks_max(self) -> float:
        """Largest KS statistic over features."""
        return float(np.max(list(self.ks.values())))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for the model card and reports."""
        return {
            "c2st_auc": self.c2st_auc,
            "c2st_auc_real_vs_real": self.c2st_auc_real_vs_real,
            "c2st_classifier": "histogram gradient boosting on flattened sequences, 2-fold",
            "ks_mean": self.ks_mean,
            "ks_max": self.ks_max,
            "ks": self.ks,
            "n_real": self.n_real,
            "n_synthetic": self.n_synthetic,
        }


def two_sample_auc(a: SequenceArray, b: SequenceArray, seed: int, threads: int = 1) -> float:
    """Held-out AUC of a classifier telling ``a`` from ``b`` (2-fold, both ways averaged).

    Both sets are cut to the smaller size so the test is balanced; 0.5 means
    indistinguishable, 1.0 means every sequence is told apart. ``threads`` caps the
    classifier's OpenMP threads: on a few hundred sequences more threads only wait for each
    other, and on a shared machine they spin (measured: 60 s instead of 1 s per test).
    """
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    if n < 4:
        raise ValueError(f"a two-sample test needs at least 4 sequences per side, got {n}")
    x = np.concatenate([a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]])
    x = x.reshape(2 * n, -1).astype(np.float64)
    y = np.r_[np.zeros(n), np.ones(n)]
    fold = rng.permutation(2 * n) % 2
    aucs = []
    with threadpool_limits(limits=threads, user_api="openmp"):
        for k in (0, 1):
            fit, test = fold != k, fold == k
            model = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
            model.fit(x[fit], y[fit])
            aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aucs))


def fidelity(
    real: SequenceArray,
    synthetic: SequenceArray,
    seed: int = 0,
    reference: SequenceArray | None = None,
    threads: int = 1,
) -> Fidelity:
    """Compare synthetic fraud sequences with held-out real ones.

    Args:
        real: real fraud sequences the GAN did not see (e.g. another period's).
        synthetic: generated sequences.
        seed: seed of the classifier and of the subsampling.
        reference: optionally, the real sequences the GAN learned from: the two-sample AUC
            of ``reference`` against ``real`` is reported as the level that real data from a
            different period reaches (drift between periods), the yardstick for ``c2st_auc``.
        threads: OpenMP threads of the two-sample classifier.
    """
    real_rows = real[present_rows(real)]
    synthetic_rows = synthetic[present_rows(synthetic)]
    ks = {
        name: float(ks_2samp(real_rows[:, i], synthetic_rows[:, i]).statistic)
        for i, name in enumerate(features.FEATURE_NAMES)
    }
    baseline = None if reference is None else two_sample_auc(reference, real, seed, threads)
    return Fidelity(
        c2st_auc=two_sample_auc(real, synthetic, seed, threads),
        c2st_auc_real_vs_real=baseline,
        ks=ks,
        n_real=len(real),
        n_synthetic=len(synthetic),
    )
