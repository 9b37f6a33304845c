"""A stand-in for a fast accelerator, as a ``backend: torch`` member of our own.

A test double for measuring the pipeline around a device, never a user-facing backend:
``forward`` holds one process-wide lock (a device runs one pass at a time), sleeps a
fixed time per row inside it (the GIL is released while it waits) and returns cheap
logits. At ``us_per_row`` = 200 the device alone allows 5,000 rows/s, about BERT-base on
a big GPU; at 50, about MiniLM. Members in one process share the one device, as members
sharing a GPU do.

The logits are a function of the rows' token ids (the sum of the ids and the token count),
so a test can check each row got its own.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEVICE_LOCK", "StandInDevice", "save_standin"]

DEVICE_LOCK = threading.Lock()


class StandInDevice(nn.Module):
    def __init__(self, us_per_row: float = 200.0, num_labels: int = 2) -> None:
        super().__init__()
        self.us_per_row = float(us_per_row)
        # A weight, so the member loads a real safetensors file like any other.
        self.scale = nn.Parameter(torch.ones(num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with DEVICE_LOCK:
            time.sleep(self.us_per_row * 1e-6 * input_ids.shape[0])
        real = attention_mask.sum(1, keepdim=True).float()
        ids = (input_ids * attention_mask).sum(1, keepdim=True).float()
        logits = torch.cat([ids % 97 / 97.0, real / 128.0], dim=1)
        return logits[:, : self.scale.shape[0]] * self.scale


def save_standin(folder: Path, us_per_row: float, num_labels: int = 2) -> Path:
    """``model.safetensors`` and ``config.json`` for a stand-in member in ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"us_per_row": us_per_row, "num_labels": num_labels}
    save_file(StandInDevice(**kwargs).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(kwargs))
    return folder
