"""Where the commands write what they generate unless told otherwise: never the source tree.

Reports (``bench``, ``evaluate``, the calibration, the burst and install measures) go to
:data:`REPORTS`, a folder of the working directory (``runs/`` is git-ignored in a checkout).
The reports the README quotes are the repository's own, in :data:`PUBLISHED_REPORTS`: a
command writes there only when asked to, with ``--out training/reports``, and
``python -m training.readme_tables`` then regenerates the README's tables from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPORTS: Final = Path("runs/reports")
PUBLISHED_REPORTS: Final = Path("training/reports")
