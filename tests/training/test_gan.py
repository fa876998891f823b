"""The sequence GAN (training/gan.py): encoding, generated structure, fidelity report."""

from __future__ import annotations

import numpy as np
import pytest

from stream_app import features
from training.dataset import Period, file_features
from training.gan import (
    GanConfig,
    SequenceCodec,
    fidelity,
    present_rows,
    train_gan,
    two_sample_auc,
)
from training.simulator import SimulatorConfig, simulate

T = 5
IX = features.FEATURE_INDEX


@pytest.fixture(scope="module")
def frauds() -> np.ndarray:
    frame = simulate(SimulatorConfig(n_customers=400, n_terminals=800, n_days=45, radius=10.0))
    data = file_features(frame)
    sequences = data.sequence_set(data.rows(Period.starting("2018-04-20", 20)), T)
    return sequences.frauds


@pytest.fixture(scope="module")
def synthetic(frauds: np.ndarray) -> np.ndarray:
    gan = train_gan(frauds, GanConfig(generator_steps=150, hidden_size=64, seed=3, threads=1))
    return gan.sample(600, seed=4)


def test_codec_round_trips_real_sequences(frauds: np.ndarray) -> None:
    codec = SequenceCodec(frauds)
    encoded = codec.encode(frauds)
    assert encoded.shape == (len(frauds), T, codec.width)
    lengths = present_rows(frauds).sum(axis=1)
    decoded = codec.decode(encoded, lengths)
    # Float32 round trips and cent rounding aside, decoding gives the sequences back.
    np.testing.assert_allclose(decoded, frauds, rtol=1e-3, atol=1e-2)


def test_padding_rows_encode_to_zero(frauds: np.ndarray) -> None:
    padded = ~present_rows(frauds)
    assert padded.any(), "the fixture should hold short histories"
    assert np.all(SequenceCodec(frauds).encode(frauds)[padded] == 0.0)


def test_samples_have_the_shape_and_padding_structure_of_sequences(
    frauds: np.ndarray, synthetic: np.ndarray
) -> None:
    assert synthetic.shape == (600, T, features.N_FEATURES)
    assert synthetic.dtype == np.float32
    present = present_rows(synthetic)
    # Real rows are the last L; padding rows in front are exactly zero, as features writes them.
    for row, mask in zip(synthetic, present, strict=True):
        length = int(mask.sum())
        assert length >= 1 and mask[T - length :].all()
        assert np.all(row[: T - length] == 0.0)


def test_samples_respect_the_features_structure(synthetic: np.ndarray) -> None:
    rows = synthetic[present_rows(synthetic)]
    for name in ("TX_DURING_WEEKEND", "TX_DURING_NIGHT"):
        assert set(np.unique(rows[:, IX[name]])) <= {0.0, 1.0}
    for w in features.CUSTOMER_WINDOWS_DAYS:
        counts = rows[:, IX[f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW"]]
        assert np.all(counts >= 1) and np.all(counts == np.round(counts))
    assert np.all(
        rows[:, IX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] <= rows[:, IX["CUSTOMER_ID_NB_TX_7DAY_WINDOW"]]
    )
    for w in features.TERMINAL_WINDOWS_DAYS:
        count = rows[:, IX[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"]]
        risk = rows[:, IX[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"]]
        assert np.all((risk >= 0) & (risk <= 1)) and np.all(count == np.round(count))
        assert np.all(risk[count == 0] == 0)
        np.testing.assert_allclose(risk * count, np.round(risk * count), atol=1e-3)
    np.testing.assert_allclose(
        rows[:, IX["LOG_TX_AMOUNT"]], np.log1p(rows[:, IX["TX_AMOUNT"]]), rtol=1e-5
    )
    hour_radius = np.hypot(rows[:, IX["TX_HOUR_SIN"]], rows[:, IX["TX_HOUR_COS"]])
    np.testing.assert_allclose(hour_radius, 1.0, rtol=1e-5)


def test_sampling_is_deterministic_for_a_seed(frauds: np.ndarray) -> None:
    config = GanConfig(generator_steps=20, hidden_size=32, seed=1, threads=1)
    a = train_gan(frauds, config).sample(50, seed=2)
    b = train_gan(frauds, config).sample(50, seed=2)
    np.testing.assert_array_equal(a, b)


def test_two_sample_auc_separates_different_sets_only() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, T, 3)).astype(np.float32)
    same = rng.normal(size=(400, T, 3)).astype(np.float32)
    shifted = (rng.normal(size=(400, T, 3)) + 1.5).astype(np.float32)
    assert two_sample_auc(a, same, seed=0) < 0.62
    assert two_sample_auc(a, shifted, seed=0) > 0.95


def test_fidelity_report(frauds: np.ndarray, synthetic: np.ndarray) -> None:
    half = len(frauds) // 2
    report = fidelity(frauds[:half], synthetic, seed=0, reference=frauds[half:])
    assert 0.0 <= report.c2st_auc <= 1.0
    assert report.c2st_auc_real_vs_real is not None
    # Real against real is the yardstick: a GAN this small is easier to tell apart.
    assert report.c2st_auc_real_vs_real < report.c2st_auc
    assert set(report.ks) == set(features.FEATURE_NAMES)
    assert all(0.0 <= v <= 1.0 for v in report.ks.values())
    assert report.ks_max >= report.ks_mean
    as_dict = report.to_dict()
    assert as_dict["n_real"] == half and as_dict["n_synthetic"] == len(synthetic)


def test_identical_sets_have_zero_ks(frauds: np.ndarray) -> None:
    report = fidelity(frauds, frauds.copy(), seed=0)
    assert report.ks_max == 0.0


def test_the_gan_needs_frauds() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        train_gan(np.zeros((1, T, features.N_FEATURES), dtype=np.float32), GanConfig())
