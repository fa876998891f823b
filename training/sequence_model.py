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

Every model family shares that input handling and the head (:class:`SequenceScorer`); a
family only says how the sequence becomes a context vector (:class:`Family`): none for the
feed-forward network (the current transaction alone), a causal 1D CNN, the LSTM, an LSTM
with attention over its outputs, or a small Transformer encoder. All take the same
``[batch, T, features]`` input and give one probability, so the worker serves any of them
as the same ONNX contract, with no family-specific code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from sklearn.tree import DecisionTreeClassifier
from torch import nn

from stream_app import features
from training.families import DEFAULT_FAMILY, FAMILIES, Family

_PRESENCE_FEATURE = features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]
_WINDOWS = features.TERMINAL_WINDOWS_DAYS
_TERMINAL_COUNTS = [features.FEATURE_INDEX[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] for w in _WINDOWS]
_TERMINAL_RISKS = [features.FEATURE_INDEX[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] for w in _WINDOWS]
_AMOUNT_RATIO = features.FEATURE_INDEX["AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY"]
_AMOUNT = features.FEATURE_INDEX["TX_AMOUNT"]
N_DERIVED = len(_TERMINAL_COUNTS) + 1
# A leaf of the cut-point tree holds at least this many training transactions.
_MIN_LEAF = 20


# Heads of the Transformer family's attention (hidden_size must divide by it).
_ATTENTION_HEADS: Final = 4
# Added to the attention logits of padding rows: no weight, and finite (ONNX, fp16-safe).
_MASKED: Final = -1e4


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network."""

    family: str = DEFAULT_FAMILY.value
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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}: one of {', '.join(FAMILIES)}")
        if self.family == Family.TRANSFORMER and self.hidden_size % _ATTENTION_HEADS:
            raise ValueError(
                f"the transformer family needs a hidden size divisible by {_ATTENTION_HEADS}, "
                f"got {self.hidden_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for the model card."""
        return asdict(self)


class SequenceScorer(nn.Module):
    """The customer's last ``T`` transactions in, a fraud probability out.

    The inputs are normalised in the graph (:meth:`normalise`); a family's :meth:`context`
    turns the sequence into a vector, which the head reads together with the current
    transaction's own inputs (a skip connection: the current transaction carries most of
    the signal, the sequence adds the customer's context).
    """

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
        # Each row as the families see it: the inputs and the presence channel.
        self.n_inputs = n_features + self.n_derived
        # The family's layers first, then the head: the order the weights are drawn in, so
        # a seed gives the same model as before the families shared this class.
        self.build_context()
        self.head = nn.Sequential(
            nn.Linear(self.context_size(cfg) + self.n_inputs, cfg.head_size),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_size, 1),
        )  # fmt: skip

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

    def build_context(self) -> None:
        """Create the family's layers (``self.config`` and ``self.n_inputs`` are set)."""

    @staticmethod
    def context_size(config: ModelConfig) -> int:
        """Width of :meth:`context`'s vector."""
        return config.hidden_size

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """The family's reading of the normalised sequence ``[B, T, inputs + 1]``: ``[B, C]``."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fraud logit of each sequence ``[B, T, F]`` (training uses this)."""
        z = self.normalise(x)
        last = torch.cat([self.context(z), z[:, -1, :-1]], dim=1)
        result: torch.Tensor = self.head(last).squeeze(1)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fraud probability of each sequence ``[B, T, F]``."""
        return torch.sigmoid(self.logits(x))


class FfnnScorer(SequenceScorer):
    """The current transaction's features alone, through the head (no history beyond
    what its features aggregate)."""

    @staticmethod
    def context_size(config: ModelConfig) -> int:
        return 0

    def context(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, -1, :0]


class CnnScorer(SequenceScorer):
    """Causal 1D convolutions over the sequence (kernel 2, left padding), max over time."""

    def build_context(self) -> None:
        cfg = self.config
        layers: list[nn.Module] = []
        width = self.n_inputs + 1
        for _ in range(max(cfg.num_layers, 1) + 1):
            layers += [nn.ConstantPad1d((1, 0), 0.0), nn.Conv1d(width, cfg.hidden_size, 2)]
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden_size
        self.conv = nn.Sequential(*layers)

    def context(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(z.transpose(1, 2))
        return out.amax(dim=2)


class LstmScorer(SequenceScorer):
    """LSTM over the customer's last ``T`` transactions; its last output is the context."""

    def build_context(self) -> None:
        cfg = self.config
        self.lstm = nn.LSTM(
            input_size=self.n_inputs + 1,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )

    def context(self, z: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(z)
        last: torch.Tensor = out[:, -1, :]
        return last


class LstmAttentionScorer(LstmScorer):
    """The LSTM, plus attention over its outputs with the last one as the query (padding
    rows get no weight): the context is the last output and the attended one."""

    def build_context(self) -> None:
        super().build_context()
        width = self.config.hidden_size
        self.query = nn.Linear(width, width, bias=False)

    @staticmethod
    def context_size(config: ModelConfig) -> int:
        return 2 * config.hidden_size

    def context(self, z: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(z)
        last = out[:, -1, :]
        scale = 1.0 / math.sqrt(self.config.hidden_size)  # a constant, not a traced shape
        logits = torch.einsum("bth,bh->bt", out, self.query(last)) * scale
        logits = logits + (1.0 - z[:, :, -1]) * _MASKED
        weights = torch.softmax(logits, dim=1)
        attended = torch.einsum("bt,bth->bh", weights, out)
        return torch.cat([last, attended], dim=1)


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, written out (ONNX-exportable as is)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(width // heads)  # a constant, not a traced shape
        self.norm_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_2 = nn.LayerNorm(width)
        self.feed = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm_1(h)).chunk(3, dim=2)
        split = (b, t, self.heads, w // self.heads)
        q, k, v = (m.reshape(split).transpose(1, 2) for m in (q, k, v))
        logits = q @ k.transpose(2, 3) * self.scale + mask[:, None, None, :]
        mixed = (torch.softmax(logits, dim=3) @ v).transpose(1, 2).reshape(b, t, w)
        h = h + self.drop(self.out(mixed))
        result: torch.Tensor = h + self.drop(self.feed(self.norm_2(h)))
        return result


class TransformerScorer(SequenceScorer):
    """A small Transformer encoder over the sequence (learned positions, padding masked);
    the last position's output is the context."""

    MAX_LENGTH: Final = 256  # features.MAX_CUSTOMER_WINDOW_TX: no history is longer

    def build_context(self) -> None:
        cfg = self.config
        self.embed = nn.Linear(self.n_inputs + 1, cfg.hidden_size)
        self.position = nn.Parameter(torch.zeros(self.MAX_LENGTH, cfg.hidden_size))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            _EncoderBlock(cfg.hidden_size, _ATTENTION_HEADS, cfg.dropout)
            for _ in range(max(cfg.num_layers, 1))
        )
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def context(self, z: torch.Tensor) -> torch.Tensor:
        t = z.shape[1]
        h = self.embed(z) + self.position[self.MAX_LENGTH - t :]
        mask = (1.0 - z[:, :, -1]) * _MASKED
        for block in self.blocks:
            h = block(h, mask)
        last: torch.Tensor = self.norm(h[:, -1, :])
        return last


_SCORERS: Final[dict[str, type[SequenceScorer]]] = {
    Family.FFNN: FfnnScorer,
    Family.CNN: CnnScorer,
    Family.LSTM: LstmScorer,
    Family.LSTM_ATTENTION: LstmAttentionScorer,
    Family.TRANSFORMER: TransformerScorer,
}


def build_scorer(
    mean: npt.NDArray[np.float64],
    std: npt.NDArray[np.float64],
    config: ModelConfig | None = None,
    cut_points: npt.NDArray[np.float64] | None = None,
) -> SequenceScorer:
    """A new (untrained) scorer of ``config.family`` for these feature statistics."""
    config = config or ModelConfig()
    return _SCORERS[config.family](mean, std, config, cut_points)


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
    model: SequenceScorer, sequences: npt.NDArray[np.float32], batch_size: int = 8192
) -> npt.NDArray[np.float64]:
    """Scores of many sequences with the PyTorch model (evaluation mode)."""
    model.eval()
    out = np.empty(len(sequences), dtype=np.float64)
    for start in range(0, len(sequences), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(sequences[start : start + batch_size]))
        out[start : start + len(chunk)] = model(chunk).double().numpy()
    return out
