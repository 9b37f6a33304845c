"""The reference: plain transformers, one row at a time, no padding, numpy math written out."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


def plain_logits(model_dir, texts, *, max_length=256, pairs=None) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            args = (text, pairs[i]) if pairs is not None else (text,)
            enc = tok(*args, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(**enc).logits[0].double().numpy())
    return np.stack(rows)


def plain_embeddings(model_dir, texts, *, max_length=256) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(**enc).last_hidden_state[0].double().mean(0).numpy())
    return np.stack(rows)


def canonical_probs(
    model_dir, texts, canonical, *, label_map=None, temperature=1.0, max_length=256
):
    """Member probabilities in canonical label order; NaN for labels the model lacks."""
    model_labels = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir)
    ).config.id2label
    z = plain_logits(model_dir, texts, max_length=max_length) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    out = np.full((len(texts), len(canonical)), np.nan)
    lower = [c.lower() for c in canonical]
    for i in range(p.shape[1]):
        name = (label_map or {}).get(model_labels[i], model_labels[i])
        out[:, lower.index(name.lower())] = p[:, i]
    return out
