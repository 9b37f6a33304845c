"""Planning: a validated config becomes an ensemble plan, and the plan becomes hosts.

:func:`plan_ensemble` reads each member's model config (cheap: no weights) and catches
every mistake it can before any Ray work. :func:`plan_hosts` decides which members share
an ensemble host and what each host asks Ray for, on the cluster at hand.

Example::

    from pipelines.config import load_config
    from pipelines.plan import plan_ensemble, plan_hosts

    plan = plan_ensemble(load_config("configs/example.yaml"))
    hosts = plan_hosts(plan.config, {"CPU": 8.0}, 8.0, cpu_fallback=True)
    assert [h.members for h in hosts] == [("alpha", "beta", "gamma")]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from actors.backends.base import BackendError, import_member_modules
from actors.tasks import HeadMismatch, MemberSpec, Task, get_task
from pipelines.config import ConfigError, EnsembleConfig, MemberConfig, is_uri
from pipelines.stacking import StackingModel
from pipelines.storage import StorageError, local_member

__all__ = [
    "EnsemblePlan",
    "HostResources",
    "cluster_shape",
    "hosts_on_cluster",
    "pin_member",
    "plan_ensemble",
    "plan_hosts",
    "without_cascade",
]

logger = logging.getLogger(__name__)

# Read, reduce and write stages are light; small CPU shares keep them from starving (or
# deadlocking against) the hosts on small machines.
LIGHT_TASK_CPUS = 0.1
LIGHT_RESERVE_CPUS = 0.5


@dataclass(frozen=True)
class EnsemblePlan:
    """A validated config plus what was read from each member's model config."""

    config: EnsembleConfig
    specs: tuple[MemberSpec, ...]
    multi_label: bool = False
    stacking: StackingModel | None = None

    @property
    def task(self) -> Task:
        return get_task(self.config.task)

    @property
    def revisions(self) -> dict[str, str]:
        """Member name -> the hub commit hash it loads, for the members given as hub ids.

        A job records these, and :meth:`with_revisions` pins a later plan to them (a
        resumed job loads what the first run loaded, even if a branch moved since)."""
        return {
            m.name: m.options.revision
            for m in self.config.members
            if getattr(m.options, "revision", None)
        }

    def with_revisions(self, revisions: Mapping[str, str]) -> EnsemblePlan:
        """This plan with the named hub members pinned to the given commit hashes (members
        not named keep theirs). Their model configs are read again at those commits, so
        the plan describes what the actors will load. Raises ConfigError for a name that
        is not a hub member here, or a value that is not a 40-hex commit hash."""
        hub = self.revisions
        unknown = sorted(set(revisions) - set(hub))
        if unknown:
            raise ConfigError(
                f"revisions for {unknown}, which are not members given as hub ids in this "
                f"ensemble (those are {sorted(hub)}); the config changed since the "
                "revisions were recorded: run the job afresh instead of resuming it"
            )
        bad = {n: r for n, r in revisions.items() if not COMMIT_HASH.fullmatch(str(r))}
        if bad:
            raise ConfigError(
                f"revisions {bad} are not commit hashes (40 hex digits); pin members only to "
                "the hashes a plan resolved (EnsemblePlan.revisions)"
            )
        members = [
            m.with_options(revision=revisions[m.name])
            if m.name in revisions and revisions[m.name] != hub[m.name]
            else m
            for m in self.config.members
        ]
        if all(a is b for a, b in zip(members, self.config.members, strict=True)):
            return self
        return plan_ensemble(self.config.model_copy(update={"members": members}))

    def member_summaries(self) -> list[dict[str, Any]]:
        """Each member as clients may see it: a model's name and never a path on this
        machine (a local folder by its own name, a hub id with its pinned commit)."""
        pinned = self.revisions
        return [
            {
                "name": m.name,
                "model": public_model_name(m.model),
                "revision": pinned.get(m.name),
                "weight": m.weight,
                "temperature": m.temperature,
            }
            for m in self.config.members
        ]


COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def without_cascade(plan: EnsemblePlan) -> EnsemblePlan:
    """The same plan running every member on every row: the same members, weights and
    combination, the ``cascade`` block removed."""
    return dataclasses.replace(plan, config=plan.config.model_copy(update={"cascade": None}))


def public_model_name(model: str) -> str:
    """A hub id as it is; a local path (absolute once the config is loaded) or a URI by
    its last component, which names the model without telling where the server keeps it."""
    if os.path.isabs(model) or "://" in model or model.startswith(("~", ".")):
        return PurePosixPath(model.replace("\\", "/").rstrip("/")).name or model
    return model


def pin_member(member: MemberConfig) -> MemberConfig:
    """The member with what it loads fixed, by its backend's optional ``pin`` (the hf
    backend resolves a hub revision to a commit hash). Runs once, on the driver.

    Raises BackendError."""
    pin = getattr(member.backend_module, "pin", None)
    # A model on object storage is no hub id: its copies are keyed by the objects' ETags.
    return member if pin is None or is_uri(member.model) else pin(member)


def describe_member(member: MemberConfig, cfg: EnsembleConfig) -> MemberSpec:
    """Read what the task needs of a member's model (not its weights) and check its head.

    Raises BackendError (the files cannot be used) or HeadMismatch (the head does not
    fit the task)."""
    import_member_modules(member)
    task = get_task(cfg.task)
    try:
        local = local_member(member)  # a model on object storage: this node's copy
    except (StorageError, OSError) as exc:
        raise BackendError(f"model: cannot copy {member.model}: {exc}") from None
    head = member.backend_module.describe(local, task)
    return task.member_spec(member, head, cfg)


def plan_ensemble(cfg: EnsembleConfig) -> EnsemblePlan:
    """Pin every member (a hub id's revision becomes a commit hash), read its model
    config and check it fits the task; raises ConfigError.

    The plan's config holds the pinned members, so every actor built from the plan loads
    the same commit (see :attr:`EnsemblePlan.revisions`)."""
    task = get_task(cfg.task)
    specs = []
    members = []
    for i, member in enumerate(cfg.members):
        try:
            import_member_modules(member)
            member = pin_member(member)
            specs.append(describe_member(member, cfg))
        except (BackendError, HeadMismatch) as exc:
            raise ConfigError(f"members[{i}] ({member.name}): {exc}") from None
        members.append(member)
    if any(a is not b for a, b in zip(members, cfg.members, strict=True)):
        # The plan carries the pinned members: actors load what was resolved here.
        cfg = cfg.model_copy(update={"members": members})
    try:
        settings = task.check_plan(cfg, specs)
    except HeadMismatch as exc:
        raise ConfigError(str(exc)) from None
    stacking = None
    if cfg.reducer.combine == "stacking":
        stacking = StackingModel.load(cfg.reducer.stacking, cfg)
        if cfg.cascade is not None:
            missing = stacking.missing_prefixes(cfg.cascade.stages, [m.name for m in cfg.members])
            if missing:
                raise ConfigError(
                    f"reducer.stacking: {cfg.reducer.stacking} has no meta-model for the "
                    f"cascade's ensemble so far over {missing}; run `ray-ensemble fit CONFIG "
                    "--combine stacking --cascade` to fit one per stage, or remove the "
                    "cascade block"
                )
    return EnsemblePlan(cfg, tuple(specs), stacking=stacking, **settings)


@dataclass(frozen=True)
class HostResources:
    """One ensemble host: the members it holds and what each replica asks Ray for.

    ``own``: a member's own host (``own_host: true``, whole GPUs, or ``colocate=False``),
    not the host the members that fit together share."""

    members: tuple[str, ...]
    num_cpus: float
    num_gpus: float
    threads: int
    min_replicas: int
    max_replicas: int
    own: bool = False


def _own_host(member: MemberConfig, on_gpu: bool) -> bool:
    return member.own_host or (on_gpu and member.num_gpus >= 1)


def _device_groups(
    cfg: EnsembleConfig, on_gpu: dict[str, bool], own: set[str], colocate: bool
) -> list[list[MemberConfig]]:
    """Members that fit on one device together, in order of their first member."""
    groups: list[list[MemberConfig]] = []
    shared_cpu: list[MemberConfig] = []
    shared_gpu: list[list[MemberConfig]] = []  # first fit, each at most one GPU
    for m in cfg.members:
        if not colocate or _own_host(m, on_gpu[m.name]):
            groups.append([m])
            own.add(m.name)
        elif on_gpu[m.name]:
            fit = next(
                (g for g in shared_gpu if sum(x.num_gpus for x in g) + m.num_gpus <= 1), None
            )
            if fit is None:
                shared_gpu.append([m])
            else:
                fit.append(m)
        else:
            shared_cpu.append(m)
    groups += shared_gpu + ([shared_cpu] if shared_cpu else [])
    groups.sort(key=lambda g: min(cfg.members.index(m) for m in g))
    return groups


def _stage_groups(
    cfg: EnsembleConfig, on_gpu: dict[str, bool], own: set[str]
) -> list[list[MemberConfig]]:
    """Hosts a row passes through in turn, for a cascade: in stage order, so that a
    stage's exit is known before a later stage's members run. A host holds the members
    of consecutive stages that share its device (all on CPU, say, which is one host)."""
    by_name = {m.name: m for m in cfg.members}
    groups: list[list[MemberConfig]] = []
    kinds: list[str] = []

    def kind(m: MemberConfig) -> str:
        if _own_host(m, on_gpu[m.name]):
            return "own"
        return "gpu" if on_gpu[m.name] else "cpu"

    for stage in cfg.cascade.stages:  # type: ignore[union-attr]
        members = [by_name[n] for n in stage]
        # Members that can join the last host first: fewer hosts, same order of stages.
        last = kinds[-1] if kinds else None
        for m in sorted(members, key=lambda m: (kind(m) != last, kind(m))):
            k = kind(m)
            shared_gpu = sum(x.num_gpus for x in groups[-1]) if groups else 0.0
            room = k == "cpu" or shared_gpu + m.num_gpus <= 1
            if k != "own" and kinds and kinds[-1] == k and room:
                groups[-1].append(m)
                continue
            groups.append([m])
            kinds.append(k)
            if k == "own":
                own.add(m.name)
    return groups


def plan_hosts(
    cfg: EnsembleConfig,
    cluster: dict,
    max_node_cpus: float,
    *,
    cpu_fallback: bool,
    colocate: bool = True,
    shared_replicas: tuple[int, int] | None = None,
    pipeline: bool = False,
) -> list[HostResources]:
    """Which members share a host, and each host's CPU, GPU and replica requests.

    Members that fit on one device share a host: every CPU member, and GPU members whose
    ``num_gpus`` add up to at most 1. A member with ``own_host: true`` or a GPU (or more)
    of its own gets a host of its own; ``colocate=False`` gives every member its own.
    Hosts without ``num_cpus`` share the CPUs evenly, leaving a little for the light
    stages so the pipeline cannot deadlock on a small machine.

    ``cpu_fallback``: with no GPU in the cluster, run GPU members on CPU (a Ray this
    process started never grows GPUs); otherwise keep asking for GPUs, which an
    autoscaling cluster adds.

    ``pipeline``: the hosts are stages a row passes through in turn (offline). With a
    cascade they then follow its stages (see :func:`_stage_groups`); online, the
    endpoint calls its hosts stage by stage itself.
    """
    total_cpus = float(cluster.get("CPU", 0))
    has_gpu = float(cluster.get("GPU", 0)) > 0
    gpu_members = [m.name for m in cfg.members if m.num_gpus > 0]
    if gpu_members and not has_gpu:
        if cpu_fallback:
            logger.warning(
                "members %s ask for GPUs but Ray has none; running them on CPU", gpu_members
            )
        else:
            logger.warning(
                "members %s ask for GPUs and the cluster has none yet: waiting for the "
                "autoscaler to add GPU nodes",
                gpu_members,
            )
            has_gpu = True
    on_gpu = {m.name: m.num_gpus > 0 and has_gpu for m in cfg.members}
    own: set[str] = set()
    if pipeline and colocate and cfg.cascade is not None:
        groups = _stage_groups(cfg, on_gpu, own)
    else:
        groups = _device_groups(cfg, on_gpu, own, colocate)

    def replicas(group: list[MemberConfig]) -> tuple[int, int]:
        if shared_replicas is not None and group[0].name not in own:
            return shared_replicas
        return max(m.replica_range[0] for m in group), max(m.replica_range[1] for m in group)

    def fixed_cpus(group: list[MemberConfig]) -> float | None:
        """The CPUs the group asks for, or None when they are shared out automatically."""
        if all(m.num_cpus is not None for m in group):
            return sum(m.num_cpus for m in group)  # type: ignore[misc]
        if all(on_gpu[m.name] for m in group):
            return sum(m.num_cpus or 1.0 for m in group)
        return None

    fixed = sum((fixed_cpus(g) or 0.0) * replicas(g)[1] for g in groups)
    auto = sum(replicas(g)[1] for g in groups if fixed_cpus(g) is None)
    spare = max(total_cpus - LIGHT_RESERVE_CPUS - fixed, LIGHT_TASK_CPUS)
    share = min(spare / auto, max_node_cpus - LIGHT_RESERVE_CPUS) if auto else 1.0
    share = max(round(share, 2), 0.1)
    hosts = []
    for group in groups:
        cpus = fixed_cpus(group)
        cpus = share if cpus is None else cpus
        gpus = sum(m.num_gpus for m in group if on_gpu[m.name])
        lo, hi = replicas(group)
        hosts.append(
            HostResources(
                tuple(m.name for m in group),
                cpus,
                gpus,
                max(1, math.ceil(cpus - 1e-9)),
                lo,
                hi,
                own=group[0].name in own,
            )
        )
    # Fixed requests can take every CPU; then the read and write tasks never start and the
    # job waits forever, with nothing to say why.
    asked = sum(h.num_cpus * h.min_replicas for h in hosts)
    if fixed and total_cpus - asked < LIGHT_TASK_CPUS - 1e-9:
        message = (
            f"the members ask for {asked:g} of Ray's {total_cpus:g} CPUs (num_cpus x replicas), "
            f"which leaves {max(total_cpus - asked, 0):g}; reading and writing rows needs at "
            f"least {LIGHT_TASK_CPUS:g} more: lower the members' num_cpus or replicas, or "
            "leave num_cpus unset to share the CPUs out automatically"
        )
        if cpu_fallback:  # a Ray this process started: no CPU will ever be added
            raise ConfigError(message)
        logger.warning("%s (or the autoscaler must add a node)", message)
    return hosts


def cluster_shape() -> tuple[dict, float]:
    """The cluster's resources, and the most CPUs on one live node (Ray must be running)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    return ray.cluster_resources(), node_cpus


def hosts_on_cluster(
    cfg: EnsembleConfig,
    *,
    cpu_fallback: bool,
    colocate: bool = True,
    shared_replicas: tuple[int, int] | None = None,
    pipeline: bool = False,
) -> list[HostResources]:
    """:func:`plan_hosts` on the running cluster, after checking that the GPU members fit
    in their share of GPU memory (ConfigError otherwise)."""
    from pipelines.placement import check_gpu_fit, cluster_gpus

    cluster, node_cpus = cluster_shape()
    if float(cluster.get("GPU", 0)) > 0:
        check_gpu_fit(cfg, cluster_gpus())
    return plan_hosts(
        cfg,
        cluster,
        node_cpus,
        cpu_fallback=cpu_fallback,
        colocate=colocate,
        shared_replicas=shared_replicas,
        pipeline=pipeline,
    )
