"""The stacking meta-model file: plain JSON beside the fitted config, never a pickle.

It holds a multinomial logistic regression over the members' log-probabilities
(see :func:`actors.reducer.stack`), with the labels and members it was fitted for, so a
file that does not match the config is refused instead of silently misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError, EnsembleConfig

FORMAT = "ray-ensemble-stacking/1"


@dataclass(frozen=True)
class StackingModel:
    labels: tuple[str, ...]
    members: tuple[str, ...]
    coef: np.ndarray  # (L, M·L)
    intercept: np.ndarray  # (L,)

    def save(self, path: str | Path) -> None:
        doc = {
            "format": FORMAT,
            "labels": list(self.labels),
            "members": list(self.members),
            "features": "log-probabilities, member-major: [member][label]",
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
        }
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, cfg: EnsembleConfig) -> StackingModel:
        """Read and check against the config; raises ConfigError naming the mismatch."""
        where = f"reducer.stacking: {path}"
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read it as JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a ray-ensemble stacking file (format {FORMAT})")
        labels = tuple(doc.get("labels") or ())
        members = tuple(doc.get("members") or ())
        want_members = tuple(m.name for m in cfg.members)
        if labels != tuple(cfg.labels or ()):
            raise ConfigError(
                f"{where}: fitted for labels {list(labels)}, the config has {cfg.labels}; "
                "run `ray-ensemble fit` again"
            )
        if members != want_members:
            raise ConfigError(
                f"{where}: fitted for members {list(members)}, the config has "
                f"{list(want_members)}; run `ray-ensemble fit` again"
            )
        try:
            coef = np.asarray(doc["coef"], dtype=np.float64)
            intercept = np.asarray(doc["intercept"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: coef and intercept must be arrays of numbers") from None
        num_labels = len(labels)
        if coef.shape != (num_labels, num_labels * len(members)) or intercept.shape != (
            num_labels,
        ):
            raise ConfigError(
                f"{where}: coef {coef.shape} / intercept {intercept.shape} do not fit "
                f"{num_labels} labels and {len(members)} members"
            )
        if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
            raise ConfigError(f"{where}: coef and intercept must be finite")
        return cls(labels, members, coef, intercept)
