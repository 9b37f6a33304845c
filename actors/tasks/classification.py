"""Sequence classification: one label per text (or per text pair), from each member's
class logits, aligned to the ensemble's labels and combined by the reducer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from actors.reducer import (
    CLASSIFICATION_COMBINE,
    UNWEIGHTED_COMBINE,
    AlignmentError,
    align_logits,
    build_label_index,
    normalise,
    prefix_top,
    reduce_classification,
)
from actors.tasks.base import (
    EnsemblePlan,
    HeadInfo,
    HeadMismatch,
    MemberSpec,
    OutputField,
    Scored,
    Task,
    check_label_set,
)

__all__ = ["ClassificationTask", "brier", "calibration_bins", "ece", "metrics", "nll"]

# Probabilities are floored here in the NLL, so one confident mistake cannot make it inf.
NLL_FLOOR = 1e-12
ECE_BINS = 15

# A head's architecture suffix, and what it does instead of classifying sequences.
OTHER_HEADS = {
    "ForTokenClassification": "a token-classification head, which tags each token (task: "
    "token_classification)",
    "ForQuestionAnswering": "a question-answering head (span start and end logits)",
    "ForMaskedLM": "a masked-language-model head and no classifier",
    "ForCausalLM": "a text-generation head and no classifier",
    "LMHeadModel": "a text-generation head and no classifier",
    "ForMultipleChoice": "a multiple-choice head",
    "Model": "no head at all (a bare encoder)",
}


def _label_json(value: Any, labels: Sequence[str]) -> Any:
    return value


def _probs_json(value: list[float], labels: Sequence[str]) -> dict[str, float]:
    return dict(zip(labels, value, strict=True))


def _member_json(value: list[float], labels: Sequence[str]) -> dict[str, Any]:
    # A label the member lacks is null, not a silent zero.
    probs = {lab: (None if v != v else v) for lab, v in zip(labels, value, strict=True)}
    scored = [(v, i) for i, v in enumerate(value) if v == v]
    return {"label": labels[max(scored)[1]] if scored else None, "probs": probs}


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels; a missing label reads as 0."""
    p = np.nan_to_num(np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y], nan=0.0)
    return float(-np.mean(np.log(np.clip(p, NLL_FLOOR, 1.0))))


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of Σₖ (pₖ − 1[k = y])²."""
    p = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_bins(
    probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
) -> list[tuple[float, float, int]]:
    """Per non-empty equal-width bin of top-label confidence: (mean confidence, accuracy,
    rows)."""
    p = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            out.append(
                (float(conf[in_bin].mean()), float(correct[in_bin].mean()), int(in_bin.sum()))
            )
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label, over ``bins`` equal-width bins."""
    return float(
        sum(n / len(y) * abs(acc - conf) for conf, acc, n in calibration_bins(probs, y, bins))
    )


def metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn), NLL, Brier score and ECE."""
    from sklearn.metrics import accuracy_score, f1_score

    p = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    pred = p.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(
            f1_score(y, pred, average="macro", labels=list(range(p.shape[1])), zero_division=0)
        ),
        "nll": nll(p, y),
        "brier": brier(p, y),
        "ece": ece(p, y),
    }


class ClassificationTask(Task):
    name = "classification"
    combine_methods = (
        "weighted_mean",
        *(c for c in CLASSIFICATION_COMBINE if c != "weighted_mean"),
    )
    hf_model_class = "AutoModelForSequenceClassification"
    trainable = True
    fittable = True
    fields = (
        OutputField("label", pa.string(), _label_json, v2_datatype="BYTES", doc="ensemble label"),
        OutputField("score", pa.float64(), _label_json, v2_datatype="FP32", doc="its probability"),
        OutputField(
            "probs",
            pa.list_(pa.float32()),
            _probs_json,
            v2_datatype="FP32",
            doc="ensemble distribution, in `labels` order",
        ),
        OutputField("agreement", pa.float64(), _label_json, v2_datatype="FP32"),
        OutputField("entropy", pa.float64(), _label_json),
        OutputField(
            "probs",
            pa.list_(pa.float32()),
            _member_json,
            member=True,
            doc="member distribution after alignment and temperature",
        ),
    )

    def check_config(self, cfg: Any) -> None:
        check_label_set(
            cfg.labels,
            "a classification ensemble needs its canonical labels, "
            "e.g. labels: [negative, positive]",
        )
        super().check_config(cfg)
        if cfg.reducer.combine == "stacking" and not cfg.reducer.stacking:
            raise ValueError(
                "reducer.stacking: 'combine: stacking' needs the meta-model file; make "
                "one with `ray-ensemble fit CONFIG --combine stacking ...`"
            )

    def check_partial(self, cfg: Any, why: str, *, any_member: bool) -> None:
        # The other combinations renormalise the weights over the members present; a
        # cascade's stage prefixes have meta-models of their own (checked in the plan,
        # which reads the file), but a quorum can miss any member.
        if cfg.reducer.combine == "stacking" and any_member:
            raise ValueError(
                f"{why}: the stacking meta-model reads every member's output; use "
                "weighted_mean or geometric_mean, or remove the setting"
            )

    def member_spec(self, member: Any, head: HeadInfo, cfg: Any) -> MemberSpec:
        _check_head(head)
        # A model that names no labels (a plain module, a graph) gives the ensemble's.
        model_labels = head.labels if head.labels is not None else tuple(cfg.labels)
        if head.width is not None and head.width != len(model_labels):
            raise HeadMismatch(
                f"output_labels: the model gives {head.width} values per row but the member "
                f"has {len(model_labels)} labels {list(model_labels)}; set output_labels to "
                "the label of each output, in order"
            )
        multi_label = head.problem_type == "multi_label_classification"
        return _align(member, cfg, tuple(model_labels), multi_label)

    def check_plan(self, cfg: Any, specs: Sequence[MemberSpec]) -> dict[str, Any]:
        multi = {s.name: s.multi_label for s in specs}
        if len(set(multi.values())) > 1:
            raise HeadMismatch(
                "members mix single-label (softmax) and multi-label (sigmoid) heads "
                f"{multi}; an ensemble needs one kind: set problem_type in the models' "
                "config.json"
            )
        multi_label = any(multi.values())
        if multi_label and cfg.cascade is not None:
            raise HeadMismatch(
                "cascade: these members are multi-label (sigmoid), which gives no single top "
                "probability to stop on; remove the cascade block"
            )
        if cfg.reducer.combine == "stacking":
            if multi_label:
                raise HeadMismatch(
                    "reducer.combine: stacking is for single-label ensembles; these members "
                    "are multi-label: use weighted_mean or geometric_mean"
                )
        else:
            _check_every_label_has_a_voter(cfg, specs)
        return {"multi_label": multi_label}

    def from_model_output(self, output: Any, attention_mask: Any) -> Any:
        return output.logits.float()

    def member_output(self, raw: np.ndarray, spec: MemberSpec, cfg: Any) -> np.ndarray:
        return align_logits(
            raw, spec.label_index, len(cfg.labels), single_logit=spec.single_logit
        ).astype(np.float32)

    def output_width(self, spec: MemberSpec, cfg: Any) -> int:
        return len(cfg.labels)

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
        red = reduce_classification(
            outputs,
            member_names=[m.name for m in cfg.members],
            temperatures=[m.temperature for m in cfg.members],
            weights=[m.weight for m in cfg.members],
            method=cfg.reducer.combine,
            multi_label=plan.multi_label,
            valid=valid,
            stacking=_meta_models(plan),
            ran=_ran(absent, cfg, len(valid)),
        )
        for i, err in enumerate(red.error):
            if err is not None:
                errors[i], valid[i] = err, False
        labels = np.asarray(cfg.labels, dtype=object)
        label = np.where(valid, labels[red.label], None)
        return Scored(
            columns={
                "label": label,
                "score": red.score,
                "probs": red.probs,
                "agreement": red.agreement,
                "entropy": red.entropy,
            },
            members={
                m.name: {"probs": p} for m, p in zip(cfg.members, red.member_probs, strict=True)
            },
            valid=valid,
            error=errors,
        )

    def exit_scores(
        self, outputs: Mapping[str, np.ndarray], plan: EnsemblePlan, members: Sequence[str]
    ) -> np.ndarray:
        cfg = plan.config
        n = len(outputs[members[0]])
        # Members not run read NaN: the combination renormalises over the others, and
        # stacking takes the meta-model of the members run.
        probs = np.stack(
            [
                normalise(outputs[m.name], temperature=m.temperature, multi_label=False)
                if m.name in members
                else np.full((n, len(cfg.labels)), np.nan)
                for m in cfg.members
            ]
        )
        weights = np.array([m.weight for m in cfg.members], dtype=np.float64)
        return prefix_top(probs, weights, cfg.reducer.combine, _meta_models(plan))

    def json_error(self, error: str | None) -> dict:
        return {"label": None, "score": None, "probs": None, "error": error}

    def metrics(self, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return metrics(probs, y)


def _meta_models(plan: EnsemblePlan) -> dict | None:
    if plan.stacking is None:
        return None
    return plan.stacking.by_members([m.name for m in plan.config.members])


def _ran(absent: Mapping[str, np.ndarray], cfg: Any, n: int) -> np.ndarray | None:
    """``(M, n)``: whether each member ran for each row; None when all ran on all."""
    if not absent:
        return None
    every = np.ones(n, dtype=bool)
    return np.stack([~absent[m.name] if m.name in absent else every for m in cfg.members])


def _check_head(head: HeadInfo) -> None:
    if head.problem_type == "regression":
        n = len(head.labels or ()) or 1
        raise HeadMismatch(
            f"has a regression head (problem_type: regression, {n} output"
            f"{'s' if n != 1 else ''}), which predicts numbers, not labels; no task here "
            "combines regressions: use a sequence-classification checkpoint"
        )
    if not head.architectures or any(
        a.endswith("ForSequenceClassification") for a in head.architectures
    ):
        return
    arch = head.architectures[0]
    what = next(
        (why for suffix, why in OTHER_HEADS.items() if arch.endswith(suffix)),
        "a head that is not a sequence classifier",
    )
    raise HeadMismatch(
        f"has {what} ({arch}); a classification ensemble needs a sequence-classification "
        "head (*ForSequenceClassification): use such a checkpoint, or fine-tune one with "
        "`ray-ensemble train`"
    )


def _align(member: Any, cfg: Any, model_labels: tuple[str, ...], multi_label: bool) -> MemberSpec:
    num = len(model_labels)
    labels = list(cfg.labels)
    single_logit = num == 1
    try:
        if single_logit:
            if multi_label or len(labels) != 2:
                raise AlignmentError(
                    "the model has a single-logit (binary) head, so the ensemble needs exactly "
                    f"2 labels, got {labels}"
                )
            mapped = (member.label_map or {}).get(model_labels[0], model_labels[0])
            lowered = [label.lower() for label in labels]
            # A default-named single logit is the positive (second) canonical label.
            positive = lowered.index(mapped.lower()) if mapped.lower() in lowered else 1
            index: tuple[int, ...] = (positive,)
        else:
            if num < 1:
                raise AlignmentError("the model config has no labels (num_labels is 0)")
            index = build_label_index(model_labels, labels, member.label_map)
    except AlignmentError as exc:
        raise HeadMismatch(str(exc)) from None
    return MemberSpec(member.name, index, single_logit, multi_label, model_labels, None)


def _check_every_label_has_a_voter(cfg: Any, specs: Sequence[MemberSpec]) -> None:
    """A canonical label no voting member has would get NaN scores (offline) and fail
    requests (online): refuse it here instead."""
    weighted = cfg.reducer.combine not in UNWEIGHTED_COMBINE
    voters = [s for s, m in zip(specs, cfg.members, strict=True) if m.weight > 0 or not weighted]
    covered = {
        i for s in voters for i in (range(len(cfg.labels)) if s.single_logit else s.label_index)
    }
    missing = [label for i, label in enumerate(cfg.labels or []) if i not in covered]
    if missing:
        who = "member" + (" with weight > 0" if weighted else "")
        raise HeadMismatch(
            f"labels: no {who} can vote for {missing}; give a member that has "
            f"{'this label' if len(missing) == 1 else 'these labels'} a weight above 0, map "
            "one onto it with label_map, or remove it from labels"
        )
