"""What a trained scorer costs to serve: ONNX Runtime time per event on one thread.

The worker scores a micro-batch with one ONNX Runtime call; this measures the same graph
(:func:`training.onnx_graph.write_onnx`) on one intra-op thread, at batch 1 (a quiet stream)
and at batch 1,000 (a busy one), as the median over repeated runs. It is the model's share
of the worker's CPU per event; parsing, state and publishing come on top (see the stream
worker benchmark).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from stream_app.models.card import INPUT_NAME, OUTPUT_NAME
from training.onnx_graph import write_onnx
from training.sequence_model import SequenceScorer

BATCHES: Final = (1, 1000)
# Runs timed per batch size (after one warm-up run); the median is kept.
_RUNS: Final = {1: 300, 1000: 15}


def onnx_us_per_event(
    model: SequenceScorer, sequences: npt.NDArray[np.float32]
) -> dict[str, float]:
    """Median µs per event at each of :data:`BATCHES`, one thread, on ``sequences`` (their
    ``T`` is the graph's; fewer rows than the largest batch are repeated to fill it)."""
    if len(sequences) == 0:
        raise ValueError("need at least one sequence to time the model on")
    if len(sequences) < max(BATCHES):
        sequences = np.resize(sequences, (max(BATCHES), *sequences.shape[1:]))
    with tempfile.TemporaryDirectory(prefix="fraudstream-cost-") as scratch:
        path = Path(scratch) / "model.onnx"
        write_onnx(model, sequences, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out: dict[str, float] = {}
        for batch in BATCHES:
            chunk = np.ascontiguousarray(sequences[:batch])
            session.run([OUTPUT_NAME], {INPUT_NAME: chunk})  # warm-up
            times = []
            for _ in range(_RUNS[batch]):
                started = time.perf_counter()
                session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
                times.append(time.perf_counter() - started)
            out[f"batch_{batch}"] = round(float(np.median(times)) / batch * 1e6, 2)
    return out
