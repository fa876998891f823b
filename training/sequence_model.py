"""The LSTM sequence scorer: raw feature sequences in, fraud probability out.

Normalisation is part of the module (and so of the exported ONNX graph): the worker feeds
raw feature values exactly as :mod:`stream_app.features` computes them. Padding rows (the
zero rows in front of a short history) are recognised by a zero transaction count in the
1-day customer window, which a real transaction never has (it counts itself), and are
masked to zero after normalisation, with a presence channel telling the LSTM which is which.

With ``ModelConfig.derived_features`` (the default) the graph also feeds each row's known
terminal frauds per window (``log1p(risk x count)``) and ``log1p`` of the amount ratio: a
product of two inputs is cheap to compute and slow to learn from a week of frauds.

With ``ModelConfig.amount_steps`` > 0 it feeds ``amount > c`` for up to that many cut points
``c`` that a shallow decision tree finds on the training period's amounts and labels
(:func:`amount_cut_points`; target-aware bins, as in Gorishniy et al. 2022): a smooth
network learns a sharp step in one input slowly, and fraud rules often are such steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.tree import DecisionTreeClassifier
from torch import nn

from stream_app import features

_PRESENCE_FEATURE = features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]
_WINDOWS = features.TERMINAL_WINDOWS_DAYS
_TERMINAL_COUNTS = [features.FEATURE_INDEX[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] for w in _WINDOWS]
_TERMINAL_RISKS = [features.FEATURE_INDEX[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] for w in _WINDOWS]
_AMOUNT_RATIO = features.FEATURE_INDEX["AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY"]
_AMOUNT = features.FEATURE_INDEX["TX_AMOUNT"]
N_DERIVED = len(_TERMINAL_COUNTS) + 1
# A leaf of the cut-point tree holds at least this many training transactions.
_MIN_LEAF = 20


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network."""

    hidden_size: int = 64
    num_layers: int = 1
    head_size: int = 64
    dropout: float = 0.1
    # Known terminal frauds per window (risk x count) and the log amount ratio, computed in
    # the graph: a compromised terminal's state is a product the network would otherwise
    # have to learn from ~500 frauds a week.
    derived_features: bool = True
    # Inputs ``amount > c`` for at most this many learned cut points (0: none).
    amount_steps: int = 7

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for the model card."""
        return asdict(self)


class LstmScorer(nn.Module):
    """LSTM over the customer's last ``T`` transactions, with the current one also fed
    straight to the head (a skip connection: the current transaction's own features carry
    most of the signal, the sequence adds the customer's context)."""

    def __init__(
        self,
        mean: npt.NDArray[np.float64],
        std: npt.NDArray[np.float64],
        config: ModelConfig | None = None,
        cut_points: npt.NDArray[np.float64] | None = None,
    ) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        n_features = len(mean)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(1.0 / std, dtype=torch.float32))
        cfg = self.config
        # Unused slots hold the largest float: no amount is above it. (A model rebuilt for
        # export gets its cut points back with its weights.)
        cuts = np.full(cfg.amount_steps, np.finfo(np.float32).max)
        if cut_points is not None:
            cuts[: len(cut_points)] = np.sort(cut_points)[: cfg.amount_steps]
        self.register_buffer("amount_cuts", torch.as_tensor(cuts, dtype=torch.float32))
        self.n_derived = (N_DERIVED if cfg.derived_features else 0) + cfg.amount_steps
        n_inputs = n_features + self.n_derived
        self.lstm = nn.LSTM(
            input_size=n_inputs + 1,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.hidden_size + n_inputs, cfg.head_size),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_size, 1),
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise real rows, zero the padding rows, append the presence channel."""
        present = (x[:, :, _PRESENCE_FEATURE : _PRESENCE_FEATURE + 1] > 0).to(x.dtype)
        z = (x - self.get_buffer("mean")) * self.get_buffer("inv_std") * present
        parts = [z]
        if self.config.derived_features:
            frauds = x[:, :, _TERMINAL_RISKS] * x[:, :, _TERMINAL_COUNTS]
            ratio = x[:, :, _AMOUNT_RATIO : _AMOUNT_RATIO + 1]
            # log1p keeps them O(1) without statistics; clamp guards log1p against a
            # negative ratio no real row has.
            derived = torch.log1p(torch.cat([frauds, ratio], dim=2).clamp(min=0.0))
            parts.append(derived * present)
        if self.config.amount_steps:
            amount = x[:, :, _AMOUNT : _AMOUNT + 1]
            parts.append((amount > self.get_buffer("amount_cuts")).to(x.dtype) * present)
        parts.append(present)
        return torch.cat(parts, dim=2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fraud logit of each sequence ``[B, T, F]`` (training uses this)."""
        z = self.normalise(x)
        out, _ = self.lstm(z)
        last = torch.cat([out[:, -1, :], z[:, -1, :-1]], dim=1)
        result: torch.Tensor = self.head(last).squeeze(1)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fraud probability of each sequence ``[B, T, F]``."""
        return torch.sigmoid(self.logits(x))


def amount_cut_points(
    sequences: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], steps: int
) -> npt.NDArray[np.float64]:
    """Up to ``steps`` amounts that best split the current transactions' frauds from the
    genuine ones: the thresholds of a decision tree with ``steps + 1`` leaves, sorted."""
    if steps < 1 or len(np.unique(labels)) < 2:
        return np.zeros(0)
    amounts = sequences[:, -1, _AMOUNT].astype(np.float64).reshape(-1, 1)
    tree = DecisionTreeClassifier(
        max_leaf_nodes=steps + 1, min_samples_leaf=_MIN_LEAF, random_state=0
    ).fit(amounts, labels)
    split = tree.tree_.feature >= 0
    return np.sort(tree.tree_.threshold[split].astype(np.float64))


def feature_statistics(
    sequences: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and std of each feature over the real (non-padding) rows of some sequences."""
    rows = sequences.reshape(-1, sequences.shape[-1]).astype(np.float64)
    rows = rows[rows[:, _PRESENCE_FEATURE] > 0]
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    return mean, np.where(std > 1e-6, std, 1.0)


@torch.no_grad()
def predict(
    model: LstmScorer, sequences: npt.NDArray[np.float32], batch_size: int = 8192
) -> npt.NDArray[np.float64]:
    """Scores of many sequences with the PyTorch model (evaluation mode)."""
    model.eval()
    out = np.empty(len(sequences), dtype=np.float64)
    for start in range(0, len(sequences), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(sequences[start : start + batch_size]))
        out[start : start + len(chunk)] = model(chunk).double().numpy()
    return out
