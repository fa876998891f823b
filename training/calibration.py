"""How far a model's scores can be read as probabilities, on its validation period.

Scores the validation period the model's card names with the served ONNX graph (as the
worker would), then reports the Brier score (and that of always answering the period's
fraud rate, for scale), the expected calibration error over equal-count bins, and the
reliability curve: per bin, the mean score against the share of frauds. The models train
with frauds weighted up (``fraud_weight``), so their scores run above the fraud rate by
design; the card's thresholds are set by alert budget and precision, not by reading a
score as a probability::

    python -m training.calibration --model-dir onnx_models/default --data data/tx.parquet

Writes ``calibration.json``, ``calibration.md`` and ``calibration.png`` to ``--out``
(default ``runs/reports``; the README's is ``training/reports``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream_app.models.card import load_card
from stream_app.models.scorer import OnnxScorer, file_sha256
from training.dataset import Period, file_features
from training.outputs import REPORTS
from training.transactions import read_transactions

# Score edges of the reliability curve's bins (and the ECE's): finer towards 1, where the
# alerts are; equal-count bins would put every fraud in the last one at a 1 % fraud rate.
EDGES: Final = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
FloatArray = npt.NDArray[np.float64]


def reliability(
    scores: FloatArray, labels: npt.NDArray[np.int64], edges: Sequence[float] = EDGES
) -> dict[str, Any]:
    """Brier score, ECE and the reliability curve over the score bins ``edges`` make.

    >>> r = reliability(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 1]), (0, 0.5, 1))
    >>> round(r["brier"], 3), round(r["ece"], 3)
    (0.01, 0.1)
    """
    bin_of = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
    curve = []
    ece = 0.0
    for b in range(len(edges) - 1):
        part = bin_of == b
        if not part.any():
            continue
        mean_score = float(scores[part].mean())
        fraud_share = float(labels[part].mean())
        ece += part.sum() / len(scores) * abs(mean_score - fraud_share)
        curve.append(
            {
                "transactions": int(part.sum()),
                "score_from": float(edges[b]),
                "score_to": float(edges[b + 1]),
                "mean_score": mean_score,
                "fraud_share": fraud_share,
            }
        )
    rate = float(labels.mean())
    return {
        "transactions": len(scores),
        "frauds": int(labels.sum()),
        "brier": float(np.mean((scores - labels) ** 2)),
        "brier_of_the_fraud_rate": float(np.mean((rate - labels) ** 2)),
        "ece": float(ece),
        "bins": curve,
    }


def validation_calibration(model_dir: Path, data: Path) -> dict[str, Any]:
    """The model's calibration on the validation period its card records."""
    card = load_card(model_dir)
    period = Period.parse(str(card.training["validation_days"]))
    features = file_features(read_transactions(data))
    rows = features.require(period, "validation")
    sequences = features.offline.sequences(card.sequence_length, rows)
    scorer = OnnxScorer(model_dir)
    scores = np.concatenate(
        [scorer.score(sequences[i : i + 8192]) for i in range(0, len(sequences), 8192)]
    ).astype(np.float64)
    result = reliability(scores, features.labels[rows])
    return {
        "model": card.version,
        "model_dir": str(model_dir),
        "validation_period": period.label,
        "data": {"path": str(data), "sha256": file_sha256(data)},
        **result,
    }


def markdown(report: dict[str, Any], command: str) -> str:
    """The calibration page."""
    lines = [
        f"# Calibration of {report['model']} on its validation period",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Validation period {report['validation_period']}: {report['transactions']:,} "
        f"transactions, {report['frauds']:,} frauds. Brier score {report['brier']:.5f} "
        f"(always answering the fraud rate: {report['brier_of_the_fraud_rate']:.5f}); "
        f"expected calibration error {report['ece']:.4f} over the score bins below.",
        "",
        "| Scores | Transactions | Mean score | Share of frauds |",
        "|---|---|---|---|",
    ]
    for b in report["bins"]:
        lines.append(
            f"| {b['score_from']:g} to {b['score_to']:g} | {b['transactions']:,} | "
            f"{b['mean_score']:.4f} | {b['fraud_share']:.4f} |"
        )
    lines += [
        "",
        "![Reliability curve](calibration.png)",
        "",
        "The model trains with each fraud weighted up (`fraud_weight` in the card), so its "
        "scores run above the share of frauds they stand for; they rank well (see "
        "`benchmark.md`) and the card's thresholds are chosen by alert budget and precision "
        "on this period, not by reading a score as a probability.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """The reliability curve, both axes logarithmic (the frauds are under 1 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = [max(b["mean_score"], 1e-5) for b in report["bins"]]
    share = [max(b["fraud_share"], 1e-5) for b in report["bins"]]
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([1e-5, 1], [1e-5, 1], color="grey", linestyle="--", label="calibrated")
    axes.plot(mean, share, marker="o", label=report["model"])
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("mean score of the bin")
    axes.set_ylabel("share of frauds in the bin")
    axes.set_title(f"Reliability, validation {report['validation_period']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("onnx_models/default"))
    parser.add_argument("--data", type=Path, default=Path("data/tx.parquet"))
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    command = f"python -m training.calibration --model-dir {args.model_dir} --data {args.data}"
    report = validation_calibration(args.model_dir, args.data)
    report["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "calibration.md").write_text(markdown(report, command))
    plot(report, args.out / "calibration.png")
    print(
        f"{report['model']}: Brier {report['brier']:.5f} (fraud rate "
        f"{report['brier_of_the_fraud_rate']:.5f}), ECE {report['ece']:.4f}; "
        f"wrote {args.out}/calibration.{{json,md,png}}"
    )


if __name__ == "__main__":
    main()
