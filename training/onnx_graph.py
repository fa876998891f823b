"""A trained scorer as an ONNX graph: the one way every family is written for serving.

:func:`training.export.export_model` writes the graph the worker serves with this and
refuses it unless ONNX Runtime agrees with PyTorch; :mod:`training.serving_cost` times the
same graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from stream_app.models.card import INPUT_NAME, OUTPUT_NAME
from training.sequence_model import SequenceScorer

OPSET: Final = 17


def write_onnx(model: SequenceScorer, sequences: npt.NDArray[np.float32], path: Path) -> None:
    """The ONNX graph of ``model`` (batch dimension dynamic, ``T`` that of ``sequences``).

    No check here: :func:`export_model` refuses a graph that differs from PyTorch.
    """
    example = torch.from_numpy(np.ascontiguousarray(sequences[:2]))
    with warnings.catch_warnings():
        # torch warns that an LSTM traced at batch 2 may fail at other batch sizes, that a
        # shape check was traced as a constant, and that a strided slice is not folded: the
        # parity check runs batch 1 and batch N and refuses the model if either came true.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch")
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
