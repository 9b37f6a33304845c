"""Will the members fit on the GPUs? Checked once Ray is up, before any actor starts.

A member's GPU memory need is estimated from its weight files (not loaded): the weights
in the dtype it runs with, plus a share for activations and the CUDA context. Each
replica gets ``num_gpus`` of one GPU, so a member fits when its need is at most
``num_gpus`` times the memory of the largest GPU in the cluster; several small members
share a GPU through fractions (``num_gpus: 0.25``), and a member with ``num_gpus`` of 2 or
more is spread over that many whole GPUs.

GPU sizes come from the driver's own GPUs when it has them, else from the nodes'
``accelerator_type`` resource (set by Ray on GPU nodes) and the table below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GpuNeed:
    member: str
    num_gpus: float
    bytes: int  # estimated GPU memory per replica
    weights: int  # of which weights, in the dtype it runs with


def weight_bytes(member: MemberConfig, *, on_gpu: bool = True) -> int | None:
    """Bytes of the member's weights in the dtype it runs with (its backend estimates
    them from the files' headers); None when unknown, e.g. a hub id not downloaded."""
    from pipelines.storage import local_member

    return member.backend_module.weight_bytes(local_member(member), on_gpu)


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
        # num_gpus of 2 or more spreads the model over that many GPUs (device_map="auto").
        share = need.num_gpus * largest
        if need.bytes / GIB > share:
            fits = need.bytes / GIB / largest
            fix = (
                f"raise num_gpus to at least {fits:.2f}"
                if fits <= 1
                else f"raise num_gpus to {math.ceil(fits)} (whole GPUs: the model is spread "
                "over them), or use a smaller model, or a dtype of float16 / bfloat16 if it "
                "is float32"
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
