"""Sentence embeddings: each member's mean-pooled vector, L2-normalised, then
concatenated or averaged, and the result L2-normalised."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from actors.reducer import EMBEDDING_COMBINE, combine_embeddings, l2_normalise
from actors.tasks.base import (
    EnsemblePlan,
    HeadInfo,
    HeadMismatch,
    MemberSpec,
    OutputField,
    Scored,
    Task,
)

__all__ = ["EmbeddingTask"]


def _vector_json(value: list[float], labels: Sequence[str]) -> list[float]:
    return value


class EmbeddingTask(Task):
    name = "embedding"
    combine_methods = tuple(sorted(EMBEDDING_COMBINE, key=lambda c: c != "mean"))
    hf_model_class = "AutoModel"
    vector_field = "embedding"
    fields = (
        OutputField(
            "embedding",
            pa.list_(pa.float32()),
            _vector_json,
            v2_datatype="FP32",
            doc="the ensemble's L2-normalised vector",
        ),
        OutputField(
            "embedding",
            pa.list_(pa.float32()),
            member=True,
            doc="the member's L2-normalised vector",
        ),
    )

    def check_config(self, cfg: Any) -> None:
        if cfg.labels:
            raise ValueError("labels: an embedding ensemble has no labels; remove the key")
        super().check_config(cfg)

    def member_spec(self, member: Any, head: HeadInfo, cfg: Any) -> MemberSpec:
        # Any encoder embeds: a classifier's checkpoint is read for its encoder alone.
        return MemberSpec(member.name, hidden_size=head.hidden_size or head.width)

    def check_plan(self, cfg: Any, specs: Sequence[MemberSpec]) -> dict[str, Any]:
        if cfg.reducer.combine == "mean":
            # A torch member's size is known only once it runs; the reducer checks it then.
            dims = {s.name: s.hidden_size for s in specs if s.hidden_size is not None}
            if len(set(dims.values())) > 1:
                raise HeadMismatch(
                    f"reducer.combine: mean needs members of one embedding size, got {dims}; "
                    "use combine: concat"
                )
        return {}

    def from_model_output(self, output: Any, attention_mask: Any) -> Any:
        # Summed in float32: a half-precision sum over many tokens loses digits.
        hidden = output.last_hidden_state.float()
        # A model spread over GPUs may end on another one than its inputs started on.
        mask = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def output_width(self, spec: MemberSpec, cfg: Any) -> int:
        return spec.hidden_size or 0

    def _reduce(
        self,
        outputs: Sequence[np.ndarray],
        plan: EnsemblePlan,
        valid: np.ndarray,
        errors: list[str | None],
        absent: Mapping[str, np.ndarray],
        inputs: dict[str, list] | None = None,
    ) -> Scored:
        cfg = plan.config
        weights = [m.weight for m in cfg.members]
        return Scored(
            columns={"embedding": combine_embeddings(outputs, weights, cfg.reducer.combine)},
            members={
                m.name: {"embedding": l2_normalise(out)}
                for m, out in zip(cfg.members, outputs, strict=True)
            },
            valid=np.asarray(valid, dtype=bool),
            error=errors,
        )
