"""The rating scale of Ledig et al. (2017, sec. 3.4): five labelled integer scores.

Defined once here: the rating page's buttons, the score check of the app and the database, and
the reports' legends all read it.
"""

from __future__ import annotations

LABELS: dict[int, str] = {1: "Bad", 2: "Poor", 3: "Fair", 4: "Good", 5: "Excellent"}
MIN_SCORE = min(LABELS)
MAX_SCORE = max(LABELS)


def legend() -> str:
    """``1 Bad, 2 Poor, ...`` for texts that spell the scale out."""
    return ", ".join(f"{k} {v}" for k, v in LABELS.items())
