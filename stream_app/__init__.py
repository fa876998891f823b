"""The live fraud-scoring service: event contract, features, state, scoring and the Faust worker.

Nothing here imports torch or the ``training`` package, so the worker installs and runs
from a slim image.
"""

__version__ = "0.1.0"
