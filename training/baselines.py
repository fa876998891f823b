"""The Handbook's reference models: logistic regression and XGBoost on transaction features.

Both see one transaction at a time (the 15 baseline features by default), standardised with
statistics of the training period only, as the Handbook's ``fit_model_and_get_predictions``
does. Hyper-parameters are the Handbook's:

* logistic regression: scikit-learn's defaults (``C=1``), ``random_state=0`` (chapter 3);
* XGBoost: 100 trees of depth 3, learning rate 0.1, ``random_state=0``: the parameters the
  Handbook's chapter 5 model selection retains and chapter 6 reuses as its reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

XGBOOST_PARAMS: Final = {"n_estimators": 100, "max_depth": 3, "learning_rate": 0.1}
LOGISTIC_PARAMS: Final = {"C": 1.0}
BASELINE_NAMES: Final = ("logistic_regression", "xgboost")


class _Classifier(Protocol):
    def fit(self, x: FloatArray, y: IntArray) -> object: ...

    def predict_proba(self, x: FloatArray) -> FloatArray: ...


@dataclass(frozen=True)
class BaselineScores:
    """Test scores of one reference model, with its fit time."""

    name: str
    scores: FloatArray
    fit_seconds: float
    params: dict[str, float]


def make_classifier(name: str, threads: int = 2) -> _Classifier:
    """A fresh, seeded reference classifier by name (see :data:`BASELINE_NAMES`)."""
    if name == "logistic_regression":
        model: _Classifier = LogisticRegression(random_state=0, max_iter=1000, **LOGISTIC_PARAMS)
        return model
    if name == "xgboost":
        return XGBClassifier(
            random_state=0, n_jobs=threads, verbosity=0, tree_method="hist", **XGBOOST_PARAMS
        )
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")


def fit_and_score(
    name: str,
    train_x: FloatArray,
    train_y: IntArray,
    test_x: FloatArray,
    threads: int = 2,
) -> BaselineScores:
    """Scale on the training rows, fit, and return the fraud probability of each test row."""
    scaler = StandardScaler().fit(train_x)
    model = make_classifier(name, threads)
    started = time.perf_counter()
    model.fit(scaler.transform(train_x), train_y)
    seconds = time.perf_counter() - started
    scores = np.asarray(model.predict_proba(scaler.transform(test_x))[:, 1], dtype=np.float64)
    params = dict(XGBOOST_PARAMS if name == "xgboost" else LOGISTIC_PARAMS)
    return BaselineScores(name=name, scores=scores, fit_seconds=seconds, params=params)
