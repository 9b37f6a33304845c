"""Online scoring on Ray Serve, in one hop: proxy → a replica of the ensemble host.

The deployment that takes the HTTP request (the routes of :class:`.http.HttpApi`,
inherited) holds the members that share a host (every CPU member; GPU members whose
fractions fit on one GPU). It batches across requests with ``@serve.batch`` at the
ensemble level, so a batch runs each member's forward once and ``plan.task.reduce``
once, the reduce of an offline window; each request gets its rows of the answer. Only
members that need a device of their own (``own_host: true``, whole GPUs) live in
deployments of their own, called through handles.

Example::

    from ray import serve
    from pipelines.config import load_config
    from pipelines.plan import plan_ensemble
    from pipelines.online import build_app

    serve.run(build_app(plan_ensemble(load_config("configs/example.yaml"))))
    # POST http://127.0.0.1:8000/v1/predict {"inputs": ["a fine film"]}

For ``serve run`` / ``serve deploy`` the import path is ``pipelines.online:app_builder``
with the argument ``config`` (see ``ray-ensemble serve-config``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.host import EnsembleHost, cascade_absent, close_stage, final_stages
from actors.tasks.base import Scored
from pipelines.online.http import ApiError, HttpApi, app, unavailable
from pipelines.plan import LIGHT_TASK_CPUS, EnsemblePlan, hosts_on_cluster, plan_ensemble

__all__ = ["EnsembleServer", "HostServer", "app_builder", "build_app"]

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

# Handle options for calls to members on hosts of their own (see docs/benchmarks.md).
HANDLE_OPTIONS: dict[str, Any] = {"_prefer_local_routing": True}

# A chunk is texts plus their pairs (None when they have none), at most max_batch_size.
# A tagger's input given as pre-split words is a list of words in place of a text.
Chunk = tuple[list[Any], list[str] | None]


def _chunk_texts(chunks: list[Chunk]) -> int:
    return sum(len(texts) for texts, _ in chunks)


# A call to a member host: the chunks of one ensemble batch, and the members to run
# (None: all it holds; a cascade's stage runs some).
HostCall = tuple[list[Chunk], tuple[str, ...] | None]


def _call_texts(calls: list[HostCall]) -> int:
    return sum(_chunk_texts(chunks) for chunks, _ in calls)


def _kind(text: Any, pair: Any) -> int:
    """0: a text; 1: a text with a pair; 2: pre-split words."""
    return 2 if isinstance(text, list) else int(pair is not None)


def chunked(texts: list[Any], pairs: list[str | None] | None, size: int) -> list[Chunk]:
    """At most ``size`` texts per chunk, all of one kind (with a pair, without, or
    pre-split words): inputs of different kinds cannot share one tokenizer call."""
    pairs = pairs if pairs is not None else [None] * len(texts)
    chunks: list[Chunk] = []
    start = 0
    while start < len(texts):
        kind = _kind(texts[start], pairs[start])
        end = start
        while end < len(texts) and end - start < size and _kind(texts[end], pairs[end]) == kind:
            end += 1
        chunks.append((texts[start:end], pairs[start:end] if kind == 1 else None))  # type: ignore[arg-type]
        start = end
    return chunks


class Linger:
    """Drives a ``@serve.batch`` method: wait for a batch to fill only under load.

    A call waits up to ``wait_s`` for company only when other calls are in flight; a
    lone request goes at once, so batching costs nothing at low load.
    """

    def __init__(self, batched: Any, max_batch_size: int, wait_s: float) -> None:
        self.batched = batched
        self.wait_s = wait_s
        self.in_flight = 0
        batched.set_max_batch_size(max_batch_size)

    async def call(self, item: Any) -> Any:
        self.in_flight += 1
        try:
            self.batched.set_batch_wait_timeout_s(self.wait_s if self.in_flight > 1 else 0.0)
            return await self.batched(item)
        finally:
            self.in_flight -= 1


def run_chunks(
    host: EnsembleHost, chunks: Sequence[Chunk], only: Collection[str] | None = None
) -> list[list[np.ndarray]]:
    """Each chunk's outputs, one array per member of ``host``, in one pass per kind.

    Chunks with and without a text pair cannot share one tokenizer call."""
    results: list[list[np.ndarray]] = [[] for _ in chunks]
    for kind in (0, 1, 2):
        idx = [i for i, (texts, pairs) in enumerate(chunks) if _kind(texts[0], pairs) == kind]
        if not idx:
            continue
        texts = [t for i in idx for t in chunks[i][0]]
        pairs = [p for i in idx for p in chunks[i][1]] if kind == 1 else None  # type: ignore[union-attr]
        if kind == 2:
            outputs = host.infer(None, None, words=texts, only=only)
        else:
            # The offline host's cut (input.max_chars), for the same answer both ways.
            outputs = host.infer(_cut(host, texts), _cut(host, pairs) if pairs else None, only=only)
        start = 0
        for i in idx:
            end = start + len(chunks[i][0])
            results[i] = [out[start:end] for out in outputs]
            start = end
    return results


# Batches a replica runs at once. Only members on a GPU use the second: see forward_chunks.
BATCHES_IN_FLIGHT = 2


async def forward_chunks(
    host: EnsembleHost, chunks: Sequence[Chunk], only: Collection[str] | None = None
) -> list[list[np.ndarray]]:
    """:func:`run_chunks`, where it runs best.

    On CPU, on the event loop Serve runs user code on (its own thread, apart from the
    loop that answers Serve's health checks): a hop to a worker thread cost more than it
    gave (docs/benchmarks.md), and requests that arrive meanwhile form the next batch,
    which starts when this one returns. With members on a GPU, on a worker thread: the
    next batch is tokenised on the loop while the device runs this one."""
    if not host.on_accelerator:
        return run_chunks(host, chunks, only)
    return await asyncio.to_thread(run_chunks, host, chunks, only)


def _select(chunks: Sequence[Chunk], rows: np.ndarray) -> list[Chunk]:
    """The chunks cut down to ``rows`` (indices over all their texts, ascending), in
    order; chunks left with no row are dropped."""
    out: list[Chunk] = []
    start = 0
    for texts, pairs in chunks:
        end = start + len(texts)
        mine = rows[(rows >= start) & (rows < end)] - start
        if mine.size:
            out.append(
                ([texts[i] for i in mine], [pairs[i] for i in mine] if pairs is not None else None)
            )
        start = end
    return out


def _cut(host: EnsembleHost, texts: list[str]) -> list[str]:
    return host.cut(pa.array(texts, pa.string())).to_pylist()


def _member_latency() -> Any:
    from ray.util import metrics

    return metrics.Histogram(
        "ensemble_member_forward_s",
        description="Seconds per member forward pass inside an ensemble host.",
        boundaries=LATENCY_BOUNDARIES,
        tag_keys=("member",),
    )


class HostServer:
    """Members with a device of their own, as a deployment the ensemble replica calls.

    Each call carries the chunks of one ensemble batch; its own ``@serve.batch`` merges
    the calls of several ensemble replicas, counting texts, not calls.
    """

    def __init__(
        self,
        *,
        plan: EnsemblePlan,
        members: tuple[str, ...],
        num_gpus: float,
        threads: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        latency = _member_latency()
        self.host = EnsembleHost(
            plan=plan,
            members=members,
            reduce=False,
            num_gpus=num_gpus,
            threads=threads,
            observe=lambda name, s: latency.observe(s, tags={"member": name}),
        )
        self.linger = Linger(self._batched, max_batch_size, batch_wait_timeout_s)

    async def ready(self) -> bool:
        return True

    async def infer(
        self, chunks: list[Chunk], only: tuple[str, ...] | None = None
    ) -> list[list[np.ndarray]]:
        """The chunks of one ensemble batch in; per chunk, one array per member out.
        ``only``: the members to run (a cascade's stage); the others' arrays are NaN."""
        return await self.linger.call((chunks, only))

    @serve.batch(batch_size_fn=_call_texts, max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _batched(self, calls: list[HostCall]) -> list[list[list[np.ndarray]]]:
        answers: list[list[list[np.ndarray]]] = [[] for _ in calls]
        # Calls for the same members share one pass.
        for only in dict.fromkeys(only for _, only in calls):
            mine = [i for i, (_, o) in enumerate(calls) if o == only]
            flat = [chunk for i in mine for chunk in calls[i][0]]
            out = await forward_chunks(self.host, flat, only)
            start = 0
            for i in mine:
                answers[i] = out[start : start + len(calls[i][0])]
                start += len(calls[i][0])
        return answers


class EnsembleServer(HttpApi):
    """The HTTP routes (inherited from :class:`HttpApi`) and the shared ensemble host,
    in one replica.

    ``local``: the members this replica holds; ``remote``: handles to the hosts of the
    members with a device of their own, and the members each holds.
    """

    def __init__(
        self,
        plan: EnsemblePlan,
        *,
        local: tuple[str, ...],
        remote: list[tuple[tuple[str, ...], DeploymentHandle]],
        num_gpus: float,
        threads: int,
        handle_options: dict[str, Any] | None = None,
    ) -> None:
        from ray.serve import metrics as serve_metrics
        from ray.util import metrics

        HttpApi.__init__(self, plan)
        self.latency = _member_latency()
        self.host = (
            EnsembleHost(
                plan=plan,
                members=local,
                reduce=False,
                num_gpus=num_gpus,
                threads=threads,
                observe=lambda name, s: self.latency.observe(s, tags={"member": name}),
            )
            if local
            else None
        )
        self.local = local
        options = HANDLE_OPTIONS if handle_options is None else handle_options
        self.remote = [(names, handle.options(**options)) for names, handle in remote]
        # Outputs come local members first, then each remote host's: put them in config
        # order, which the reduce expects.
        held = list(local) + [m for names, _ in remote for m in names]
        self.order = [held.index(m.name) for m in self.cfg.members]
        self.linger = Linger(
            self._batched, self.limits.max_batch_size, self.limits.batch_wait_timeout_s
        )
        self.agreement = metrics.Histogram(
            "ensemble_agreement",
            description="Agreement of the members with the ensemble label, per prediction.",
            boundaries=[0.001, 0.25, 0.5, 0.75, 0.999],
        )
        self.rows = metrics.Counter("ensemble_rows_total", description="Texts scored.")
        self.disagreed = metrics.Counter(
            "ensemble_disagreed_rows_total",
            description="Texts where some voting member's top label differs from the "
            "ensemble's; divide by ensemble_rows_total for the share.",
        )
        # Served as ray_ensemble_partial_answers_total{member}.
        self.partial = serve_metrics.Counter(
            "ensemble_partial_answers_total",
            description="Texts answered without a member whose host failed or did not "
            "answer within serve.member_timeout_s (a quorum answer).",
            tag_keys=("member",),
        )
        self.plan_specs = {spec.name: spec for spec in plan.specs}

    async def members_not_ready(self) -> list[str]:
        """Members on hosts of their own that do not answer yet. This replica's own
        members are loaded before it takes any request."""

        async def ready(handle: DeploymentHandle) -> bool:
            try:
                return await asyncio.wait_for(
                    handle.options(method_name="ready").remote(), timeout=1.0
                )
            except Exception:  # not started yet, still loading, or gone
                return False

        states = await asyncio.gather(*(ready(h) for _, h in self.remote))
        return [
            m for (names, _), ok in zip(self.remote, states, strict=True) if not ok for m in names
        ]

    async def score(self, texts: list[str], pairs: list[str | None] | None) -> Scored:
        """The request's rows, scored in the batches it shares with other requests."""
        chunks = chunked(texts, pairs, self.limits.max_batch_size)
        answers = await asyncio.gather(*(self.linger.call(c) for c in chunks))
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers[0] if len(answers) == 1 else Scored.concat(answers)

    async def count_tokens(self, texts: list[str]) -> int:
        """Tokens the first local member's tokenizer makes of ``texts`` (OpenAI's usage);
        0 when every member is on a host of its own."""
        if self.host is None:
            return 0
        try:
            encoded = self.host.members[0].encode(_cut(self.host, texts))
        except Exception:  # a backend without a tokenizer: usage is not worth a 500
            return 0
        return sum(len(ids) for ids in encoded["input_ids"])

    def _observe(self, scored: Scored) -> None:
        valid = np.asarray(scored.valid, dtype=bool)
        self.rows.inc(int(valid.sum()))
        agreement = scored.columns.get("agreement")
        if agreement is None:
            return
        values = np.asarray(agreement, dtype=np.float64)[valid]
        for value in values.tolist():
            self.agreement.observe(value)
        disagreed = int((values < 1.0 - 1e-9).sum())
        if disagreed:
            self.disagreed.inc(disagreed)

    @serve.batch(batch_size_fn=_chunk_texts, max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _batched(self, chunks: list[Chunk]) -> list[Scored | BaseException]:
        """One forward per member and one reduce for the chunks of concurrent requests.

        A chunk's failure is its answer, not the batch's: when a batch fails on its
        input, each chunk is run alone, so only the request at fault gets its 422.
        """
        try:
            return await self._run(chunks)
        except Exception as exc:
            if len(chunks) == 1 or unavailable(exc) or isinstance(exc, ApiError):
                return [exc] * len(chunks)
        answers: list[Scored | BaseException] = []
        for chunk in chunks:
            try:
                answers += await self._run([chunk])
            except Exception as exc:
                answers.append(exc)
        return answers

    async def _run(self, chunks: list[Chunk]) -> list[Scored]:
        """Each chunk's rows through the members and ``plan.task.reduce``, the reduce of
        an offline window, run once for the whole batch."""
        if self.cfg.cascade is not None:
            scored = await self._run_cascade(chunks)
        else:
            per_chunk, missing = await self._forward(chunks)
            outputs = [
                self.task.concat_outputs([outs[k] for outs in per_chunk]) for k in self.order
            ]
            items = [t for texts, _ in chunks for t in texts]
            gone = {name: np.ones(len(items), dtype=bool) for name in missing}
            inputs = None
            if self.task.takes_words:
                inputs = {
                    "text": [None if isinstance(t, list) else t for t in items],
                    "words": [t if isinstance(t, list) else None for t in items],
                }
            scored = self.task.reduce(
                outputs, plan=self.plan, absent=gone, missing=gone, inputs=inputs
            )
        for name, rows in scored.missing.items():
            self.partial.inc(int(np.sum(rows & scored.valid)), tags={"member": name})
        self._observe(scored)
        answers, start = [], 0
        for texts, _ in chunks:
            answers.append(scored.rows_between(start, start + len(texts)))
            start += len(texts)
        return answers

    async def _forward(self, chunks: list[Chunk]) -> tuple[list[list[np.ndarray]], list[str]]:
        """Per chunk, each member's outputs, local members first (NaN for the members of
        a host that failed or timed out); and those members, when a quorum still holds."""
        calls = [h.infer.remote(chunks) for _, h in self.remote]
        per_chunk: list[list[np.ndarray]] = [[] for _ in chunks]
        if self.host is not None:
            for i, outs in enumerate(await forward_chunks(self.host, chunks)):
                per_chunk[i] += outs
        results = await asyncio.gather(
            *(self._answer(names, c) for (names, _), c in zip(self.remote, calls, strict=True))
        )
        missing: list[str] = []
        failures: list[BaseException] = []
        for (names, _), result in zip(self.remote, results, strict=True):
            if isinstance(result, BaseException):
                missing += names
                failures.append(result)
        self._check_quorum(missing, failures)
        for (names, _), result in zip(self.remote, results, strict=True):
            if isinstance(result, BaseException):
                # A missing member's outputs: NaN rows, which the reduce leaves out.
                widths = [self.task.output_width(self.plan_specs[m], self.cfg) for m in names]
                result = [
                    [np.full((len(texts), w), np.nan, np.float32) for w in widths]
                    for texts, _ in chunks
                ]
            for i, outs in enumerate(result):
                per_chunk[i] += outs
        return per_chunk, missing

    async def _run_cascade(self, chunks: list[Chunk]) -> Scored:
        """The batch stage by stage, as an offline host runs a window: each stage's
        members (here and on member hosts) on the rows still open, then the exit rule."""
        cfg, cascade = self.cfg, self.cfg.cascade
        n = _chunk_texts(chunks)
        outputs = {
            m.name: np.full(
                (n, self.task.output_width(self.plan_specs[m.name], cfg)), np.nan, np.float32
            )
            for m in cfg.members
        }
        state = np.zeros(n, dtype=np.int64)
        valid = np.ones(n, dtype=bool)
        missing: dict[str, np.ndarray] = {}
        failures: list[BaseException] = []
        for s, stage in enumerate(cascade.stages):
            rows = np.flatnonzero(state == 0)
            if rows.size == 0:
                break  # every row stopped: the later stages have nothing to do
            part = _select(chunks, rows)
            local = tuple(m for m in stage if m in self.local)
            remote = [
                (names, h, tuple(m for m in names if m in stage))
                for names, h in self.remote
                if any(m in stage for m in names)
            ]
            calls = [h.infer.remote(part, only) for _, h, only in remote]
            if local and self.host is not None:
                got = await forward_chunks(self.host, part, local)
                for k, member in enumerate(self.host.members):
                    if member.member.name in local:
                        outputs[member.member.name][rows] = np.concatenate([c[k] for c in got])
            results = await asyncio.gather(
                *(self._answer(only, c) for (_, _, only), c in zip(remote, calls, strict=True))
            )
            for (names, _, only), result in zip(remote, results, strict=True):
                if isinstance(result, BaseException):
                    failures.append(result)
                    for m in only:
                        missing[m] = np.isin(np.arange(n), rows)
                    continue
                for k, name in enumerate(names):
                    if name in only:
                        outputs[name][rows] = np.concatenate([c[k] for c in result])
            self._check_quorum(missing, failures)
            if s < len(cascade.exit_at):
                close_stage(self.plan, outputs, state, valid, s)
        stages = final_stages(self.plan, state)
        absent = cascade_absent(self.plan, stages)
        for name, rows_missing in missing.items():
            absent[name] = absent[name] | rows_missing
        return self.task.reduce(
            [outputs[m.name] for m in cfg.members],
            plan=self.plan,
            absent=absent,
            missing=missing,
            cascade_stage=stages,
        )

    def _check_quorum(self, missing: Collection[str], failures: list[BaseException]) -> None:
        """Raise the first member host's failure when the members left are fewer than
        ``serve.min_members``."""
        if missing and len(self.cfg.members) - len(missing) < self.quorum:
            raise failures[0]

    async def _answer(self, names: tuple[str, ...], call: Any) -> Any:
        """A member host's answer, or why there is none: it failed, or did not answer
        within ``serve.member_timeout_s``. A fault of the input is the request's."""
        from actors.host import UnscorableText

        timeout = self.limits.member_timeout_s
        try:
            return await asyncio.wait_for(call, timeout) if timeout else await call
        except UnscorableText:
            raise
        except asyncio.TimeoutError:
            call.cancel()
            logger.warning("members %s did not answer within %ss", list(names), timeout)
            return ApiError(
                503,
                f"members {list(names)} did not answer within serve.member_timeout_s "
                f"({timeout}s) and the rest are fewer than serve.min_members ({self.quorum}); "
                "retry later",
                "unavailable",
            )
        except Exception as exc:
            logger.warning("members %s failed: %s: %s", list(names), type(exc).__name__, exc)
            return exc


EnsembleDeployment = serve.deployment(serve.ingress(app)(EnsembleServer), name="ensemble")
HostDeployment = serve.deployment(HostServer, name="host")


def _threads(num_cpus: float) -> int:
    """Torch threads for a replica: the whole CPUs it holds. The fraction left over is
    the proxy's and the event loops': a thread more than that made the tail worse and
    the throughput lower on 2 cores (docs/benchmarks.md)."""
    return max(1, int(num_cpus + 1e-9))


def _scaling(lo: int, hi: int, target: int) -> dict[str, Any]:
    if lo == hi:
        return {"num_replicas": lo}
    return {
        "autoscaling_config": {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": target,
        }
    }


def build_app(
    plan: EnsemblePlan,
    *,
    cpu_fallback: bool = False,
    colocate: bool = True,
    handle_options: dict[str, Any] | None = None,
) -> serve.Application:
    """The Serve application for an ensemble. Ray must be running (its shape sets CPUs).

    ``cpu_fallback``: run GPU members on CPU when Ray has none (a local Ray).
    ``colocate=False`` gives every member a deployment of its own (the per-member
    layout, for comparison); ``handle_options`` override :data:`HANDLE_OPTIONS`."""
    cfg = plan.config
    limits = cfg.serve
    hosts = hosts_on_cluster(
        cfg,
        cpu_fallback=cpu_fallback,
        colocate=colocate,
        shared_replicas=limits.replica_range,
    )
    shared = next((h for h in hosts if not h.own), None)
    remote = []
    for res in hosts:
        if res is shared:
            continue
        options: dict[str, Any] = {
            "name": "host_" + "_".join(res.members),
            "ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
            # Enough calls in flight that a full batch can form.
            "max_ongoing_requests": max(2 * limits.max_batch_size, 16),
            "max_queued_requests": max(limits.max_queued_requests * 4, 64),
            **_scaling(res.min_replicas, res.max_replicas, max(limits.max_batch_size, 2)),
        }
        handle = HostDeployment.options(**options).bind(
            plan=plan,
            members=res.members,
            num_gpus=res.num_gpus,
            threads=_threads(res.num_cpus),
            max_batch_size=limits.max_batch_size,
            batch_wait_timeout_s=limits.batch_wait_timeout_s,
        )
        remote.append((res.members, handle))
    lo, hi = limits.replica_range
    # Serve's limits are the backstop, ours the answer: the replica refuses past
    # max_ongoing + max_queued requests with a JSON 503 (HttpApi._scored), which it can
    # only do for requests Serve hands it, so Serve admits ten times that, and its own
    # plain-text 503s come only far beyond the configured load. (Serve counts a request
    # as queued while it picks a replica, so its queue limit must not be tight either.)
    admitted = 10 * (limits.max_ongoing_requests + limits.max_queued_requests)
    return EnsembleDeployment.options(
        ray_actor_options={
            "num_cpus": shared.num_cpus if shared else LIGHT_TASK_CPUS,
            "num_gpus": shared.num_gpus if shared else 0,
        },
        max_ongoing_requests=admitted,
        max_queued_requests=admitted,
        **_scaling(lo, hi, limits.max_ongoing_requests),
    ).bind(
        plan,
        local=shared.members if shared else (),
        remote=remote,
        num_gpus=shared.num_gpus if shared else 0.0,
        threads=_threads(shared.num_cpus) if shared else 1,
        handle_options=handle_options,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run`` / ``serve deploy``: ``import_path: pipelines.online:app_builder``,
    ``args: {config: path/to/ensemble.yaml}`` (and ``cpu_fallback: true`` to run GPU
    members on CPU where Ray has no GPU)."""
    from pipelines.config import load_config

    if "config" not in args:
        raise ValueError("app_builder needs the argument `config`: the ensemble YAML path")
    plan = plan_ensemble(load_config(args["config"]))
    return build_app(plan, cpu_fallback=bool(args.get("cpu_fallback", False)))
