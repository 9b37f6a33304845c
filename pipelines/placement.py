"""Will the members fit on the GPUs? Checked once Ray is up, before any actor starts.

A member's GPU memory need is estimated from its weight files (not loaded): the weights
in the dtype it runs with, plus a share for activations and the CUDA context. Each
replica gets ``num_gpus`` of one GPU, so a member fits when its need is at most
``num_gpus`` times the memory of the largest GPU in the cluster; several small members
share a GPU through fractions (``num_gpus: 0.25``).

GPU sizes come from the driver's own GPUs when it has them, else from the nodes'
``accelerator_type`` resource (set by Ray on GPU nodes) and the table below.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from actors.loading import MemberLoadError
from pipelines.config import ConfigError, EnsembleConfig, MemberConfig

__all__ = ["GpuNeed", "check_gpu_fit", "cluster_gpus", "estimate_gpu_need", "weight_bytes"]

GIB = 1024**3
# Memory of common cloud GPUs by Ray's accelerator_type name, in GiB.
ACCELERATOR_MEMORY_GIB = {
    "A10G": 24,
    "L4": 24,
    "T4": 16,
    "V100": 16,
    "P100": 16,
    "A100": 40,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
    "L40S": 48,
    "A10": 24,
}
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ACTIVATION_SHARE = 0.2  # of the weights, for a batch of activations at inference
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


@dataclass(frozen=True)
class GpuNeed:
    member: str
    num_gpus: float
    bytes: int  # estimated GPU memory per replica
    weights: int  # of which weights, in the dtype it runs with


def _safetensors_elements(path: Path) -> tuple[int, int]:
    """(parameters, bytes as stored) from a safetensors header, without reading the data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    params = stored = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        params += count
        stored += count * SAFETENSORS_BYTES.get(info["dtype"], 4)
    return params, stored


def weight_bytes(member: MemberConfig, *, on_gpu: bool = True) -> int | None:
    """Bytes of the member's weights in the dtype it runs with; None when unknown (a hub
    id that is not downloaded)."""
    path = Path(member.model)
    if member.backend == "onnx":
        from actors.backends import find_onnx_file

        try:
            return find_onnx_file(member.model).stat().st_size
        except MemberLoadError:  # not one .onnx file: plan_ensemble has said so already
            return None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        bins = sorted(path.glob("*.bin")) if path.is_dir() else []
        return sum(f.stat().st_size for f in bins) if bins else None
    params = stored = 0
    for f in files:
        p, s = _safetensors_elements(f)
        params, stored = params + p, stored + s
    if member.dtype in DTYPE_BYTES:
        return params * DTYPE_BYTES[member.dtype]
    # auto: half precision on a GPU, as stored otherwise.
    return params * 2 if on_gpu else stored


def estimate_gpu_need(member: MemberConfig) -> GpuNeed | None:
    weights = weight_bytes(member)
    if weights is None:
        return None
    need = int(weights * (1 + ACTIVATION_SHARE)) + CUDA_CONTEXT_BYTES
    return GpuNeed(member.name, member.num_gpus, need, weights)


def cluster_gpus() -> list[float]:
    """Memory (GiB) of each GPU type the cluster has now; empty when unknown or none."""
    try:
        import torch

        if torch.cuda.is_available():
            return sorted(
                {
                    torch.cuda.get_device_properties(i).total_memory / GIB
                    for i in range(torch.cuda.device_count())
                }
            )
    except Exception:  # a broken CUDA install must not stop a CPU run
        pass
    import ray

    sizes = set()
    for node in ray.nodes():
        if not node.get("Alive") or node["Resources"].get("GPU", 0) <= 0:
            continue
        for key in node["Resources"]:
            if key.startswith("accelerator_type:"):
                size = ACCELERATOR_MEMORY_GIB.get(key.split(":", 1)[1])
                if size:
                    sizes.add(float(size))
    return sorted(sizes)


def check_gpu_fit(cfg: EnsembleConfig, gpu_sizes_gib: list[float]) -> list[GpuNeed]:
    """Raise ConfigError naming every member whose share of a GPU is too small.

    ``gpu_sizes_gib``: the memory of each GPU type present (largest one counts). Nothing
    is checked without GPUs: members then run on CPU.
    """
    needs = [n for m in cfg.members if m.num_gpus > 0 and (n := estimate_gpu_need(m))]
    if not gpu_sizes_gib or not needs:
        return needs
    largest = max(gpu_sizes_gib)
    problems = []
    for need in needs:
        share = min(need.num_gpus, 1.0) * largest
        if need.bytes / GIB > share:
            fits = need.bytes / GIB / largest
            fix = (
                f"raise num_gpus to at least {fits:.2f}"
                if fits <= 1
                else "use a smaller model, or a dtype of float16 / bfloat16 if it is float32"
            )
            problems.append(
                f"  {need.member}: needs about {need.bytes / GIB:.1f} GiB "
                f"({need.weights / GIB:.1f} GiB of weights + activations + CUDA context), "
                f"but num_gpus {need.num_gpus:g} of a {largest:g} GiB GPU gives it "
                f"{share:.1f} GiB; {fix}"
            )
    if problems:
        raise ConfigError("members do not fit on the cluster's GPUs:\n" + "\n".join(problems))
    return needs
