"""The LSTM training loop (training/train.py) on small hand-made sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_app import features
from training.dataset import SequenceSet
from training.gan import GanConfig
from training.sequence_model import LstmScorer, ModelConfig, amount_cut_points, predict
from training.train import (
    Augment,
    AugmentConfig,
    TrainConfig,
    fit_sequence_model,
    train_scorer,
)

T = 3
IX = features.FEATURE_INDEX
SMALL = TrainConfig(
    sequence_length=T,
    max_epochs=6,
    patience=2,
    batch_size=128,
    threads=1,  # tiny batches: a second thread only waits (and spins on a busy machine)
    model=ModelConfig(hidden_size=8, head_size=8, dropout=0.0),
)


def _sequences(n: int, seed: int) -> SequenceSet:
    """Plausible raw rows; a transaction is fraud when its amount is far above the
    customer's previous ones, which only the sequence shows."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, T, features.N_FEATURES), dtype=np.float32)
    x[:, :, IX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] = rng.integers(1, 5, (n, T))
    base = rng.uniform(10, 100, (n, 1))
    x[:, :, IX["TX_AMOUNT"]] = base * rng.uniform(0.5, 1.5, (n, T))
    fraud = rng.random(n) < 0.1
    x[fraud, -1, IX["TX_AMOUNT"]] *= 4.0
    x[:, :, IX["LOG_TX_AMOUNT"]] = np.log1p(x[:, :, IX["TX_AMOUNT"]])
    x[: n // 5, 0, :] = 0.0  # some short histories
    return SequenceSet(
        sequences=x,
        labels=fraud.astype(np.int64),
        days=np.zeros(n, dtype=np.int64),
        customers=np.arange(n, dtype=np.int64),
    )


@pytest.fixture(scope="module")
def sets() -> tuple[SequenceSet, SequenceSet]:
    return _sequences(3000, 0), _sequences(1000, 1)


def test_the_model_learns_and_keeps_its_best_epoch(sets: tuple[SequenceSet, SequenceSet]) -> None:
    train, valid = sets
    seen: list[float] = []
    result = train_scorer(train, valid, SMALL, lambda log: seen.append(log.valid_average_precision))
    assert result.best_valid_average_precision > 0.8
    assert result.best_valid_average_precision == max(seen)
    assert result.history[result.best_epoch - 1].improved
    assert seen.index(max(seen)) + 1 == result.best_epoch
    assert not result.model.training and next(result.model.parameters()).device.type == "cpu"
    # The returned weights are the best epoch's, not the last one's.
    from sklearn.metrics import average_precision_score

    ap = average_precision_score(valid.labels, predict(result.model, valid.sequences))
    assert ap == pytest.approx(result.best_valid_average_precision, abs=1e-6)


def test_training_is_deterministic_for_a_seed(sets: tuple[SequenceSet, SequenceSet]) -> None:
    train, valid = sets
    config = TrainConfig(**{**SMALL.__dict__, "max_epochs": 2})
    a = predict(train_scorer(train, valid, config).model, valid.sequences)
    b = predict(train_scorer(train, valid, config).model, valid.sequences)
    np.testing.assert_array_equal(a, b)
    other = TrainConfig(**{**config.__dict__, "seed": 1})
    assert not np.array_equal(a, predict(train_scorer(train, valid, other).model, valid.sequences))


def test_synthetic_frauds_do_not_move_the_normalisation(
    sets: tuple[SequenceSet, SequenceSet],
) -> None:
    train, valid = sets
    config = TrainConfig(**{**SMALL.__dict__, "max_epochs": 1})
    plain = train_scorer(train, valid, config).model
    extra = train.frauds * 100.0  # absurd values: must not change the statistics
    mixed = train_scorer(train.with_frauds(extra), valid, config).model
    torch.testing.assert_close(plain.get_buffer("mean"), mixed.get_buffer("mean"))


@pytest.mark.parametrize("mode", list(Augment))
def test_fit_adds_the_asked_frauds(sets: tuple[SequenceSet, SequenceSet], mode: Augment) -> None:
    train, valid = sets
    config = TrainConfig(**{**SMALL.__dict__, "max_epochs": 1})
    augment = AugmentConfig(
        mode=mode, ratio=0.5, gan=GanConfig(generator_steps=5, hidden_size=16, threads=1)
    )
    fit = fit_sequence_model(train, valid, config, augment)
    expected = 0 if mode == Augment.NONE else round(0.5 * len(train.frauds))
    assert fit.n_extra_frauds == expected
    assert (fit.fidelity is not None) == (mode == Augment.GAN)
    described = fit.describe()
    assert described["augment"]["mode"] == mode.value
    assert ("gan_fidelity" in described) == (mode == Augment.GAN)


def test_amount_cut_points_find_a_fraud_rule_and_feed_it_as_a_step() -> None:
    # Every amount above 220 is a fraud, plus a few frauds below it: the first cut is 220.
    rng = np.random.default_rng(4)
    n = 20_000
    sequences = np.zeros((n, 2, features.N_FEATURES), dtype=np.float32)
    amount = features.FEATURE_INDEX["TX_AMOUNT"]
    sequences[:, :, amount] = rng.gamma(2.0, 30.0, (n, 2))
    sequences[:, :, features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] = 1.0
    labels = ((sequences[:, -1, amount] > 220) | (rng.random(n) < 0.005)).astype(np.int64)
    cuts = amount_cut_points(sequences, labels, steps=3)
    assert 1 <= len(cuts) <= 3 and np.all(np.diff(cuts) > 0)
    assert np.min(np.abs(cuts - 220.0)) < 1.0
    assert len(amount_cut_points(sequences, np.zeros(n, dtype=np.int64), steps=3)) == 0

    mean, std = np.zeros(features.N_FEATURES), np.ones(features.N_FEATURES)
    model = LstmScorer(mean, std, ModelConfig(amount_steps=3), cuts)
    probe = np.zeros((2, 1, features.N_FEATURES), dtype=np.float32)
    probe[:, 0, features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] = 1.0
    near = cuts[np.argmin(np.abs(cuts - 220.0))]
    probe[:, 0, amount] = [near - 0.5, near + 0.5]
    inputs = model.normalise(torch.from_numpy(probe))[:, 0, :]
    steps = inputs[:, -1 - 3 : -1]  # the step inputs sit just before the presence channel
    # Exactly one step (the one at ``near``) differs between the two amounts.
    assert (steps[1] - steps[0]).tolist().count(1.0) == 1
    assert (steps[1] - steps[0]).abs().sum().item() == 1.0
