"""Token classification (NER, tagging): one tag per word, combined across members whose
tokenizers split the text differently.

Words are the unit everything is combined on, so members with different tokenizers
agree on what they score. The words are ``input.words_column`` (pre-split, as CoNLL
data comes), or the text split by :data:`WORD_PATTERN`: maximal runs of ``\\w``
characters, and every other non-space character on its own.

Per member: the raw text is tokenised with character offsets (the words with
``is_split_into_words`` when they were given), in windows of ``max_length`` tokens that
overlap by ``stride`` tokens; each sub-token belongs to the first word its span overlaps
(special tokens and empty spans to none); a word in which no sub-token starts takes the
sub-token that covers it. A word's logits come from the window where its first
sub-token is furthest from an edge, and are its first sub-token's (``aggregation:
first``), or the mean or max over its sub-tokens. The reducer then runs per word, with
the classification combiners: temperature, softmax, alignment NaNs, per-tag weight
renormalisation, agreement.

Example::

    >>> split_words("Ada Lovelace, 1815.")
    (['Ada', 'Lovelace', ',', '1815', '.'], [(0, 3), (4, 12), (12, 13), (14, 18), (18, 19)])
    >>> decode_entities(["B-PER", "I-PER", "O", "I-LOC"], [0.9, 0.7, 0.99, 0.6])
    [('PER', 0, 2, 0.8), ('LOC', 3, 4, 0.6)]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from actors.reducer import (
    CLASSIFICATION_COMBINE,
    AlignmentError,
    build_label_index,
    reduce_classification,
)
from actors.tasks.base import (
    ERROR_FIELD,
    EnsemblePlan,
    HeadInfo,
    HeadMismatch,
    MemberSpec,
    OutputField,
    Scored,
    Task,
    check_label_set,
)

__all__ = [
    "AGGREGATIONS",
    "WORD_PATTERN",
    "TokenClassificationTask",
    "aggregate_words",
    "decode_entities",
    "default_stride",
    "first_token_labels",
    "training_batch",
    "split_words",
    "word_tokens",
]

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
AGGREGATIONS = ("first", "average", "max")
DEFAULT_AGGREGATION = "first"

ENTITY_TYPE = pa.struct(
    [
        ("type", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("start_char", pa.int32()),
        ("end_char", pa.int32()),
        ("text", pa.string()),
        ("score", pa.float64()),
    ]
)
MATRIX = pa.list_(pa.list_(pa.float32()))


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of ``text`` and their ``[start, end)`` character offsets."""
    words, offsets = [], []
    for m in WORD_PATTERN.finditer(text):
        words.append(m.group())
        offsets.append(m.span())
    return words, offsets


def default_stride(max_length: int) -> int:
    """Tokens shared by consecutive windows when ``stride`` is unset: a quarter of the
    window, so every word has context on both sides in some window."""
    return max(0, max_length // 4)


def word_tokens(
    token_spans: Sequence[tuple[int, int] | None], word_offsets: Sequence[tuple[int, int]]
) -> list[list[int]]:
    """For each word, the positions of its sub-tokens in one window.

    ``token_spans``: per token its ``[start, end)`` characters, None for a special token.
    A sub-token belongs to the first word its span overlaps; a word no sub-token belongs
    to takes the sub-tokens that cover it (overlap it). Words outside the window get [].

    >>> word_tokens([None, (0, 2), (2, 5), (5, 9), None], [(0, 5), (6, 9)])
    [[1, 2], [3]]
    """
    starts = np.fromiter((s for s, _ in word_offsets), dtype=np.int64, count=len(word_offsets))
    ends = np.fromiter((e for _, e in word_offsets), dtype=np.int64, count=len(word_offsets))
    own: list[list[int]] = [[] for _ in word_offsets]
    covering: dict[int, list[int]] = {}
    for pos, span in enumerate(token_spans):
        if span is None or span[1] <= span[0]:
            continue
        ts, te = span
        first = int(np.searchsorted(ends, ts, side="right"))  # first word ending after ts
        last = int(np.searchsorted(starts, te, side="left"))  # first word starting at/after te
        if first >= last:
            continue  # only spaces
        own[first].append(pos)
        for w in range(first + 1, last):
            covering.setdefault(w, []).append(pos)
    for w, positions in covering.items():
        if not own[w]:
            own[w] = positions
    return own


def first_token_labels(
    positions: Sequence[Sequence[int]], word_labels: Sequence[int], length: int
) -> list[int]:
    """Training labels for one tokenised row: each word's label on its first sub-token,
    -100 (ignored by the loss) on every other token. ``positions``: per word, its token
    positions (:func:`word_tokens`, or the tokenizer's ``word_ids``); a word cut off by
    truncation has none.

    >>> first_token_labels([[1, 2], [3]], [4, 0], 5)
    [-100, 4, -100, 0, -100]
    """
    out = [-100] * length
    for toks, label in zip(positions, word_labels, strict=True):
        if toks and out[toks[0]] == -100:
            out[toks[0]] = int(label)
    return out


def training_batch(
    tokenizer: Any,
    rows: Sequence[str] | Sequence[Sequence[str]],
    tags: Sequence[Sequence[int]],
    max_length: int,
    *,
    given: bool,
) -> tuple[dict[str, list[list[int]]], list[list[int]]]:
    """Padded token inputs and labels for fine-tuning a tagger (`ray-ensemble train`).

    ``rows``: texts (split by :data:`WORD_PATTERN`, tokenised with offsets, sub-tokens
    mapped to words as when scoring) or, ``given``, pre-split words (tokenised with
    ``is_split_into_words``). ``tags``: per row, a label index per word."""
    if given:
        enc = tokenizer(
            [list(w) for w in rows],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
        )
    else:
        enc = tokenizer(
            list(rows),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_offsets_mapping=True,
        )
    width = len(enc["input_ids"][0]) if len(rows) else 0
    labels = []
    for i, (row, y) in enumerate(zip(rows, tags, strict=True)):
        if given:
            positions: list[list[int]] = [[] for _ in row]
            for pos, wid in enumerate(enc.word_ids(i)):
                if wid is not None:
                    positions[wid].append(pos)
        else:
            seq = enc.sequence_ids(i)
            spans = [
                tuple(span) if seq[k] is not None else None
                for k, span in enumerate(enc["offset_mapping"][i])
            ]
            positions = word_tokens(spans, split_words(str(row))[1])
        labels.append(first_token_labels(positions, y, width))
    inputs = {k: v for k, v in enc.items() if k != "offset_mapping"}
    return inputs, labels


def aggregate_words(logits: np.ndarray, positions: Sequence[Sequence[int]], how: str) -> np.ndarray:
    """``(W, k)`` word logits from one window's ``(t, k)`` token logits."""
    if how == "first":
        return logits[[p[0] for p in positions]]
    reduce = np.mean if how == "average" else np.max
    return np.stack([reduce(logits[list(p)], axis=0) for p in positions])


def decode_entities(
    tags: Sequence[str], scores: Sequence[float]
) -> list[tuple[str, int, int, float]]:
    """Entities ``(type, start, end, score)`` from BIO tags, word indices end-exclusive.

    An entity starts at ``B-X``, or at an ``I-X`` that does not continue an ``X`` entity,
    and runs over the following ``I-X`` words; its score is the mean of its words' tag
    probabilities."""
    out: list[tuple[str, int, int, float]] = []
    kind: str | None = None
    start = 0

    def close(end: int) -> None:
        if kind is not None:
            out.append((kind, start, end, float(np.mean(scores[start:end]))))

    for i, tag in enumerate(tags):
        prefix, _, name = tag.partition("-")
        if prefix == "I" and name and kind == name:
            continue
        close(i)
        if prefix in ("B", "I") and name:
            kind, start = name, i
        else:
            kind = None
    close(len(tags))
    return out


@dataclass
class Prepared:
    """A member's windows for some rows: ``encoded`` goes to the forward pass, and per row
    which window and which token positions each word reads."""

    encoded: dict[str, list[list[int]]]
    row_windows: list[list[int]]  # per row, its windows' indices
    word_window: list[np.ndarray]  # per row, (W,) the window each word reads
    word_positions: list[list[list[int]]]  # per row, per word, its token positions there
    row_failed: dict[int, str]  # rows no token of the member could read, and why


def _json_same(value: Any, labels: Sequence[str]) -> Any:
    return value


def _member_json(value: list[list[float]], labels: Sequence[str]) -> dict[str, Any]:
    tags = []
    for word in value:
        scored = [(v, i) for i, v in enumerate(word) if v == v]
        tags.append(labels[max(scored)[1]] if scored else None)
    return {"tags": tags}


class TokenClassificationTask(Task):
    name = "token_classification"
    combine_methods = (
        "weighted_mean",
        *(c for c in CLASSIFICATION_COMBINE if c not in ("weighted_mean", "stacking")),
    )
    hf_model_class = "AutoModelForTokenClassification"
    trainable = True
    # `fit` runs on words: each word is a row of the classification fit.
    fittable = True
    takes_words = True
    fields = (
        # Rows have a length of their own: the Open Inference Protocol gets each row's
        # list as a JSON string in a BYTES tensor of shape [n].
        OutputField(
            "words",
            pa.list_(pa.string()),
            _json_same,
            v2_datatype="BYTES",
            doc="the words, as split",
        ),
        OutputField(
            "word_offsets",
            pa.list_(pa.list_(pa.int32())),
            doc="[start, end) characters of each word (null with input.words_column)",
        ),
        OutputField(
            "tags",
            pa.list_(pa.string()),
            _json_same,
            v2_datatype="BYTES",
            doc="the ensemble's tag per word",
        ),
        OutputField(
            "tag_scores",
            pa.list_(pa.float64()),
            _json_same,
            v2_datatype="BYTES",
            doc="the probability of that tag",
        ),
        OutputField("probs", MATRIX, doc="per word, the ensemble's distribution"),
        OutputField(
            "entities",
            pa.list_(ENTITY_TYPE),
            _json_same,
            v2_datatype="BYTES",
            doc="decoded entities",
        ),
        OutputField(
            "agreement", pa.float64(), _json_same, v2_datatype="FP32", doc="mean over words"
        ),
        OutputField(
            "probs", MATRIX, _member_json, member=True, doc="per word, the member's distribution"
        ),
    )

    # --- config and plan ---------------------------------------------------------------

    def check_config(self, cfg: Any) -> None:
        check_label_set(
            cfg.labels,
            "a token_classification ensemble needs its tag set in the BIO scheme, "
            "e.g. labels: [O, B-PER, I-PER, B-LOC, I-LOC]",
        )
        bad = [t for t in cfg.labels if not (t == "O" or re.fullmatch(r"[BI]-\S+", t))]
        if bad:
            raise ValueError(
                f"labels: {bad} are not BIO tags; use O, B-<type> and I-<type> (e.g. B-PER)"
            )
        super().check_config(cfg)
        if cfg.input.text_pair_column:
            raise ValueError(
                "input.text_pair_column: token_classification tags one text per row; remove it"
            )
        for i, m in enumerate(cfg.members):
            stride = m.stride if m.stride is not None else default_stride(m.max_length)
            if stride >= m.max_length - 2:
                raise ValueError(
                    f"members[{i}] ({m.name}).stride: {stride} leaves no new tokens in a "
                    f"window of max_length {m.max_length} (2 are special tokens); set stride "
                    f"below {max(0, m.max_length - 2)}"
                )

    def member_spec(self, member: Any, head: HeadInfo, cfg: Any) -> MemberSpec:
        if head.architectures and not any(
            a.endswith("ForTokenClassification") for a in head.architectures
        ):
            raise HeadMismatch(
                f"has a {head.architectures[0]} head; a token_classification ensemble needs "
                "a token-classification head (*ForTokenClassification): use such a checkpoint"
            )
        model_labels = head.labels if head.labels else tuple(cfg.labels)
        try:
            index = build_label_index(model_labels, cfg.labels, member.label_map)
        except AlignmentError as exc:
            raise HeadMismatch(str(exc)) from None
        return MemberSpec(member.name, index, model_labels=tuple(model_labels))

    def from_model_output(self, output: Any, attention_mask: Any) -> Any:
        return output.logits.float()

    def output_width(self, spec: MemberSpec, cfg: Any) -> int:
        # Only windows with no valid row ask: their (empty) outputs are in `labels` order.
        return len(cfg.labels)

    # --- per member: words in, per-word aligned logits out -------------------------------

    def row_words(
        self, texts: Sequence[str] | None, words: Sequence[Sequence[str]] | None
    ) -> tuple[list[list[str]], list[list[tuple[int, int]]] | None]:
        """The words of each row and, split from text, their offsets."""
        if words is not None:
            return [list(w) for w in words], None
        split = [split_words(t) for t in texts or ()]
        return [w for w, _ in split], [o for _, o in split]

    def encode_key(self, member: Any) -> object:
        return member.stride

    def encode_rows(
        self,
        host: Any,
        texts: Sequence[str] | None,
        pairs: Sequence[str] | None,
        words: Sequence[Sequence[str]] | None,
    ) -> tuple[dict[str, list[list[int]]], Prepared]:
        member = host.member
        tokenizer = getattr(host.backend, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise HeadMismatch(
                f"member {member.name}: token_classification needs a fast (Rust) Hugging Face "
                "tokenizer for character offsets; give the member a tokenizer.json"
            )
        row_words, offsets = self.row_words(texts, words)
        stride = member.stride if member.stride is not None else default_stride(member.max_length)
        given = words is not None
        inputs = row_words if given else list(texts or ())
        n = len(inputs)
        if n == 0:
            return {"input_ids": []}, Prepared({"input_ids": []}, [], [], [], {})
        with host.backend.tokenizer_lock:
            enc = tokenizer(
                inputs,
                is_split_into_words=given,
                truncation=True,
                max_length=member.max_length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=not given,
                return_attention_mask=False,
                return_token_type_ids=False,
                padding=False,
            )
        ids = enc["input_ids"]
        owner = enc["overflow_to_sample_mapping"]
        row_windows: list[list[int]] = [[] for _ in range(n)]
        for w, r in enumerate(owner):
            row_windows[r].append(w)
        word_window: list[np.ndarray] = []
        word_positions: list[list[list[int]]] = []
        row_failed: dict[int, str] = {}
        for r in range(n):
            count = len(row_words[r])
            best = np.full(count, -1, dtype=np.int64)
            best_gap = np.full(count, -1, dtype=np.int64)
            positions: list[list[int]] = [[] for _ in range(count)]
            for w in row_windows[r]:
                seq = enc.sequence_ids(w)
                content = [i for i, s in enumerate(seq) if s is not None]
                if not content:
                    continue
                lo, hi = content[0], content[-1]
                if given:
                    per_word: list[list[int]] = [[] for _ in range(count)]
                    for pos, wid in enumerate(enc.word_ids(w)):
                        if wid is not None and seq[pos] is not None:
                            per_word[wid].append(pos)
                else:
                    spans = [
                        tuple(span) if seq[i] is not None else None
                        for i, span in enumerate(enc["offset_mapping"][w])
                    ]
                    per_word = word_tokens(spans, offsets[r])  # type: ignore[index]
                for k, toks in enumerate(per_word):
                    if not toks:
                        continue
                    gap = min(toks[0] - lo, hi - toks[0])
                    if gap > best_gap[k]:
                        best_gap[k], best[k], positions[k] = gap, w, toks
            if not _fill_wordless(best, positions):
                row_failed[r] = f"member {member.name}: no word of this text gave a token"
            word_window.append(best)
            word_positions.append(positions)
        encoded = {"input_ids": ids}
        return encoded, Prepared(encoded, row_windows, word_window, word_positions, row_failed)

    def finish_rows(
        self,
        raw: np.ndarray,
        prepared: Prepared,
        host: Any,
        window_failed: dict[int, str],
        failed: dict[int, str],
    ) -> list[np.ndarray]:
        """Per row, the ``(W, L)`` aligned word logits (NaN for tags the member lacks)."""
        cfg = self.plan_config(host)
        labels = len(cfg.labels)
        index = list(host.spec.label_index)
        how = host.member.aggregation or DEFAULT_AGGREGATION
        out: list[np.ndarray] = []
        for r, windows in enumerate(prepared.row_windows):
            count = len(prepared.word_window[r])
            aligned = np.full((count, labels), np.nan, dtype=np.float32)
            lost = [window_failed[w] for w in windows if w in window_failed]
            if r in prepared.row_failed:
                lost.append(prepared.row_failed[r])
            if lost:
                failed[r] = lost[0]
            elif count:
                chosen = prepared.word_window[r]
                rows = []
                for w in np.unique(chosen):
                    words = np.flatnonzero(chosen == w)
                    pos = [prepared.word_positions[r][k] for k in words]
                    rows.append((words, aggregate_words(raw[w], pos, how)))
                for words, values in rows:
                    aligned[np.ix_(words, index)] = values
            out.append(aligned)
        return out

    @staticmethod
    def plan_config(host: Any) -> Any:
        return host.plan.config

    # --- the host's intermediate column ----------------------------------------------------

    def member_column(
        self, values: Sequence[np.ndarray], rows: np.ndarray, valid: np.ndarray, n: int, width: int
    ) -> pa.Array:
        per_row: list[np.ndarray | None] = [None] * n
        for r, v in zip(rows, values, strict=True):
            if valid[r]:
                per_row[int(r)] = v
        return _matrix_array(per_row, width)

    def read_member_column(self, column: pa.Array) -> list[np.ndarray | None]:
        return _read_matrix(column)

    def concat_outputs(self, parts: Sequence[Any]) -> list[np.ndarray | None]:
        return [row for part in parts for row in part]

    # --- reduce ------------------------------------------------------------------------------

    def _reduce(
        self,
        outputs: Sequence[Any],
        plan: EnsemblePlan,
        valid: np.ndarray,
        errors: list[str | None],
        absent: Mapping[str, np.ndarray],
        inputs: dict[str, list] | None = None,
    ) -> Scored:
        # ``absent`` is always empty: check_partial refuses quorums and cascades here.
        cfg = plan.config
        n = len(errors)
        inputs = inputs or {}
        # Per row, its words given, or its text (cut as the host cut it) to split.
        words_in = inputs.get("words") or [None] * n
        texts = [
            t[: cfg.input.max_chars] if isinstance(t, str) else None
            for t in (inputs.get("text") or [None] * n)
        ]
        labels = len(cfg.labels)
        counts = np.zeros(n, dtype=np.int64)
        stacked: list[list[np.ndarray]] = [[] for _ in outputs]
        for r in range(n):
            if not valid[r]:
                continue
            mats = [out[r] for out in outputs]
            if any(m is None for m in mats):
                valid[r] = False
                errors[r] = errors[r] or "a member did not score this row"
                continue
            counts[r] = mats[0].shape[0]
            for i, m in enumerate(mats):
                stacked[i].append(np.asarray(m, dtype=np.float64).reshape(-1, labels))
        flat = [
            np.concatenate(s) if s else np.zeros((0, labels), dtype=np.float64) for s in stacked
        ]
        red = reduce_classification(
            flat,
            member_names=[m.name for m in cfg.members],
            temperatures=[m.temperature for m in cfg.members],
            weights=[m.weight for m in cfg.members],
            method=cfg.reducer.combine,
            multi_label=False,
        )
        tag_names = np.asarray(cfg.labels, dtype=object)
        cols: dict[str, list] = {k: [None] * n for k in self._column_names()}
        member_cols: dict[str, list] = {m.name: [None] * n for m in cfg.members}
        agreement = np.full(n, np.nan)
        start = 0
        for r in range(n):
            if not valid[r]:
                continue
            stop = start + int(counts[r])
            bad = [e for e in red.error[start:stop] if e is not None]
            if bad:
                valid[r], errors[r] = False, bad[0]
                start = stop
                continue
            if words_in[r] is not None:
                words, offsets = list(words_in[r]), None
            else:
                words, offsets = split_words(texts[r] or "")
            tags = [str(t) for t in tag_names[red.label[start:stop]]]
            scores = red.score[start:stop].astype(np.float64)
            entities = []
            for kind, s, e, score in decode_entities(tags, scores):
                if offsets is None:
                    sc = ec = None
                    text = " ".join(words[s:e])
                else:
                    sc, ec = offsets[s][0], offsets[e - 1][1]
                    text = texts[r][sc:ec]  # type: ignore[index]
                entities.append(
                    {
                        "type": kind,
                        "start": s,
                        "end": e,
                        "start_char": sc,
                        "end_char": ec,
                        "text": text,
                        "score": score,
                    }
                )
            cols["words"][r] = words
            cols["word_offsets"][r] = None if offsets is None else [list(o) for o in offsets]
            cols["tags"][r] = tags
            cols["tag_scores"][r] = scores.tolist()
            cols["probs"][r] = red.probs[start:stop].astype(np.float32)
            cols["entities"][r] = entities
            agreement[r] = float(np.mean(red.agreement[start:stop])) if stop > start else 1.0
            for i, m in enumerate(cfg.members):
                member_cols[m.name][r] = red.member_probs[i, start:stop].astype(np.float32)
            start = stop
        columns = {k: _objects(v) for k, v in cols.items()}
        columns["agreement"] = agreement
        return Scored(
            columns=columns,
            members={name: {"probs": _objects(v)} for name, v in member_cols.items()},
            valid=valid,
            error=errors,
        )

    def _column_names(self) -> list[str]:
        return [f.name for f in self.fields if not f.member and f.name != "agreement"]

    # --- renderings ----------------------------------------------------------------------------

    def to_arrow(self, scored: Scored, cfg: Any) -> dict[str, pa.Array]:
        out: dict[str, pa.Array] = {}
        width = len(cfg.labels)
        for f, member in self.output_fields(cfg):
            if f is ERROR_FIELD:
                out[f.name] = pa.array(scored.error, type=pa.string())
                continue
            values = scored.members[member][f.name] if member else scored.columns[f.name]
            if f.arrow_type == MATRIX:
                out[f.column(member)] = _matrix_array(list(values), width).cast(MATRIX)
            elif f.name == "agreement":
                out[f.name] = pa.array(
                    np.asarray(values, dtype=np.float64), mask=~scored.valid, type=f.arrow_type
                )
            else:
                out[f.column(member)] = pa.array(list(values), type=f.arrow_type)
        return out

    def to_json(self, scored: Scored, cfg: Any) -> list[dict]:
        labels = list(cfg.labels)
        records: list[dict] = []
        for i in range(scored.rows):
            if not scored.valid[i]:
                records.append(self.json_error(scored.error[i]))
                continue
            record: dict[str, Any] = {
                "words": scored.columns["words"][i],
                "tags": scored.columns["tags"][i],
                "tag_scores": scored.columns["tag_scores"][i],
                "entities": scored.columns["entities"][i],
                "agreement": float(scored.columns["agreement"][i]),
            }
            if scored.columns["word_offsets"][i] is not None:
                record["word_offsets"] = scored.columns["word_offsets"][i]
            if cfg.reducer.output_members:
                record["members"] = {
                    m: _member_json(np.asarray(f["probs"][i]).tolist(), labels)
                    for m, f in scored.members.items()
                }
            records.append(record)
        return records

    def json_error(self, error: str | None) -> dict:
        return {"words": None, "tags": None, "tag_scores": None, "entities": None, "error": error}


def _fill_wordless(best: np.ndarray, positions: list[list[int]]) -> bool:
    """A word no token touches (a character its tokenizer drops) reads the nearest
    earlier word's tokens (else the next one's), so every word gets a tag. False when no
    word has a token at all."""
    count = len(best)
    for k in range(count):
        if best[k] >= 0:
            continue
        near = next((j for j in range(k - 1, -1, -1) if best[j] >= 0 and positions[j]), None)
        if near is None:
            near = next((j for j in range(k + 1, count) if best[j] >= 0 and positions[j]), None)
        if near is not None:
            best[k], positions[k] = best[near], positions[near]
    return not (count and (best < 0).any())


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _matrix_array(rows: Sequence[np.ndarray | None], width: int) -> pa.Array:
    """``list<fixed_size_list<float32>>`` from per-row ``(W, width)`` arrays (None: null)."""
    counts = np.array([0 if r is None else len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    parts = [np.asarray(r, dtype=np.float32).reshape(-1) for r in rows if r is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
    mask = pa.array([r is None for r in rows], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)


def _read_matrix(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type.value_type):
        column = column.cast(pa.list_(pa.list_(pa.float32(), 1)))  # pragma: no cover
    width = column.type.value_type.list_size
    flat = column.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    offsets = column.offsets.to_numpy()
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    return [None if nulls[i] else flat[offsets[i] : offsets[i + 1]] for i in range(len(column))]
