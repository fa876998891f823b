"""The model families a scorer can be (torch-free, so command help can list them).

Every family reads the same ``[batch, T, features]`` sequences and gives one probability;
only how it reads the sequence differs (:mod:`training.sequence_model`).
"""

from __future__ import annotations

import enum
from typing import Final


class Family(enum.StrEnum):
    """How a scorer reads the customer's sequence (the rest is shared)."""

    FFNN = "ffnn"  # the current transaction's features only
    CNN = "cnn"  # causal 1D convolutions over the sequence
    LSTM = "lstm"
    LSTM_ATTENTION = "lstm_attention"  # attention over the LSTM's outputs, the last as query
    TRANSFORMER = "transformer"  # a small encoder, the last position read out


FAMILIES: Final = tuple(str(f) for f in Family)
DEFAULT_FAMILY: Final = Family.LSTM
