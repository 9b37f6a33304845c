"""The stacking meta-model file: plain JSON beside the fitted config, never a pickle.

It holds a multinomial logistic regression over the members' log-probabilities
(see :func:`actors.reducer.stack`), with the labels and members it was fitted for, so a
file that does not match the config is refused instead of silently misread.

A cascade's ensemble so far after each stage but the last is a meta-model of its own,
over the members run so far: `fit --cascade` stores them under ``prefixes`` (the last
prefix, every member, is the top-level model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ConfigError, EnsembleConfig

FORMAT = "ray-ensemble-stacking/1"


@dataclass(frozen=True)
class StackingModel:
    labels: tuple[str, ...]
    members: tuple[str, ...]
    coef: np.ndarray  # (L, M·L)
    intercept: np.ndarray  # (L,)
    # Meta-models over some of the members (a cascade's stage prefixes), each with its
    # ``members`` in the config's order; ``labels`` as above.
    prefixes: tuple[StackingModel, ...] = ()

    def save(self, path: str | Path) -> None:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "labels": list(self.labels),
            "members": list(self.members),
            "features": "log-probabilities, member-major: [member][label]",
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
        }
        if self.prefixes:
            doc["prefixes"] = [
                {
                    "members": list(p.members),
                    "coef": p.coef.tolist(),
                    "intercept": p.intercept.tolist(),
                }
                for p in self.prefixes
            ]
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    def by_members(
        self, names: Sequence[str]
    ) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
        """Every meta-model keyed by the indices in ``names`` (the config's members) of
        the members it reads, in order: the form :func:`actors.reducer.stack_present`
        takes."""
        index = {n: i for i, n in enumerate(names)}
        return {
            tuple(index[m] for m in model.members): (model.coef, model.intercept)
            for model in (self, *self.prefixes)
        }

    def missing_prefixes(
        self, stages: Sequence[Sequence[str]], names: Sequence[str]
    ) -> list[list[str]]:
        """The stage prefixes of a cascade (all but the last) this file has no
        meta-model for, each in the config's order."""
        have = self.by_members(names)
        return [[names[j] for j in key] for key in prefix_members(stages, names) if key not in have]

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
        prefixes = doc.get("prefixes") or []
        if not isinstance(prefixes, list) or not all(isinstance(p, dict) for p in prefixes):
            raise ConfigError(f"{where}: prefixes must be a list of objects")
        parsed = []
        for k, entry in enumerate(prefixes):
            sub = tuple(entry.get("members") or ())
            in_order = tuple(m for m in want_members if m in sub)
            if not sub or sub != in_order or len(sub) >= len(want_members):
                raise ConfigError(
                    f"{where}: prefixes[{k}].members {list(sub)} must be some of the members "
                    f"{list(want_members)}, in that order; run `ray-ensemble fit` again"
                )
            parsed.append(
                cls(labels, sub, *_weights(entry, len(labels), len(sub), f"{where}: prefixes[{k}]"))
            )
        return cls(labels, members, *_weights(doc, len(labels), len(members), where), tuple(parsed))


def prefix_members(stages: Sequence[Sequence[str]], names: Sequence[str]) -> list[tuple[int, ...]]:
    """The members run by each stage prefix of a cascade but the last (that one is every
    member), as indices in ``names`` (the config's members), in that order.

    >>> prefix_members([["c"], ["a"], ["b"]], ["a", "b", "c"])
    [(2,), (0, 2)]
    """
    return [
        tuple(j for j, n in enumerate(names) if any(n in stage for stage in stages[:i]))
        for i in range(1, len(stages))
    ]


def _weights(
    doc: dict, num_labels: int, num_members: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    try:
        coef = np.asarray(doc["coef"], dtype=np.float64)
        intercept = np.asarray(doc["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: coef and intercept must be arrays of numbers") from None
    if coef.shape != (num_labels, num_labels * num_members) or intercept.shape != (num_labels,):
        raise ConfigError(
            f"{where}: coef {coef.shape} / intercept {intercept.shape} do not fit "
            f"{num_labels} labels and {num_members} members"
        )
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise ConfigError(f"{where}: coef and intercept must be finite")
    return coef, intercept
