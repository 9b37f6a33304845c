"""Models that transformers does not know, as a user would bring them.

- ``ToyConfig`` / ``ToyForSequenceClassification``: a Hugging Face architecture that is
  not in transformers; importing this module registers it with the Auto classes, which
  is all a member's ``register: [tests.custom_models]`` needs.
- ``MeanPoolClassifier``: a plain ``nn.Module`` for ``backend: torch``.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

TOY_MODEL_TYPE = "ray-ensemble-toy"


class ToyConfig(PretrainedConfig):
    model_type = TOY_MODEL_TYPE

    def __init__(self, vocab_size: int = 100, dim: int = 16, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.dim = dim
        super().__init__(**kwargs)


class ToyForSequenceClassification(PreTrainedModel):
    """Embeddings, masked max-pool, a tanh layer and a linear head."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.hidden = nn.Linear(config.dim, config.dim)
        self.head = nn.Linear(config.dim, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=1.0)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, **_: object) -> SequenceClassifierOutput:
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h.masked_fill(attention_mask[..., None] == 0, -1e4)
        pooled = torch.tanh(self.hidden(h.max(dim=1).values))
        return SequenceClassifierOutput(logits=self.head(pooled))


AutoConfig.register(TOY_MODEL_TYPE, ToyConfig)
AutoModelForSequenceClassification.register(ToyConfig, ToyForSequenceClassification)


class MeanPoolClassifier(nn.Module):
    """A bag of embeddings: mean over real tokens, then a two-layer head."""

    def __init__(self, vocab_size: int, dim: int, num_labels: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask[..., None].to(torch.float32)
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.mlp(pooled)


class Sleeper(nn.Module):
    """A member slow on purpose: a forward pass over a batch holding the token
    ``slow_id`` sleeps ``sleep_s`` first (other batches answer at once). Mean-pooled
    embeddings and a linear head."""

    def __init__(
        self, vocab_size: int, dim: int, num_labels: int, slow_id: int, sleep_s: float
    ) -> None:
        super().__init__()
        self.slow_id = int(slow_id)
        self.sleep_s = float(sleep_s)
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((input_ids == self.slow_id).any()):
            time.sleep(self.sleep_s)
        m = attention_mask[..., None].to(torch.float32)
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled)
