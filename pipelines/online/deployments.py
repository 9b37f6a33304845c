"""Online scoring on Ray Serve, in one hop: proxy → a replica of the ensemble host.

The deployment that takes the HTTP request (FastAPI on the same class) holds the
members that share a host (every CPU member; GPU members whose fractions fit on one
GPU). It batches across requests with ``@serve.batch`` at the ensemble level, so a
batch runs each member's forward once and one reduce, the same ``reduce_batch`` as the
offline pipeline. Only members that need a device of their own (``own_host: true``,
whole GPUs) live in deployments of their own, called through handles.

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
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from actors.host import EnsembleHost, UnscorableText, reduce_batch, reduce_members
from actors.member import member_output_column
from actors.reducer import member_top
from pipelines.plan import LIGHT_TASK_CPUS, EnsemblePlan, hosts_on_cluster, plan_ensemble

__all__ = ["EnsembleServer", "HostServer", "app_builder", "build_app"]

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

# Handle options for calls to members on hosts of their own (see docs/benchmarks.md).
HANDLE_OPTIONS: dict[str, Any] = {"_prefer_local_routing": True}


class PairInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., description="The text to score.")
    text_pair: str | None = Field(None, description="Optional second segment (NLI, pairs).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str | PairInput] = Field(
        ...,
        description="Texts, or {text, text_pair} objects; at most serve.max_inputs of them.",
        examples=[["a fine film", "a dull plot"]],
    )


class ErrorResponse(JSONResponse):
    """``{"error", "type"}``, ASCII-escaped: a message may quote a client's key or text,
    and a lone surrogate in it must not turn a 4xx into a 500 while encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return ErrorResponse({"error": message, "type": kind}, status_code=status)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "PairInput"):
            continue  # union branch names say nothing to a client
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


# A chunk is texts plus their pairs (None when they have none), at most max_batch_size.
Chunk = tuple[list[str], list[str] | None]


def _chunk_texts(chunks: list[Chunk]) -> int:
    return sum(len(texts) for texts, _ in chunks)


def _call_texts(calls: list[list[Chunk]]) -> int:
    return sum(_chunk_texts(call) for call in calls)


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


def run_chunks(host: EnsembleHost, chunks: Sequence[Chunk]) -> list[list[np.ndarray]]:
    """Each chunk's outputs, one array per member of ``host``, in one pass per kind.

    Chunks with and without a text pair cannot share one tokenizer call."""
    results: list[list[np.ndarray]] = [[] for _ in chunks]
    for with_pair in (False, True):
        idx = [i for i, (_, pairs) in enumerate(chunks) if (pairs is not None) == with_pair]
        if not idx:
            continue
        texts = [t for i in idx for t in chunks[i][0]]
        pairs = [p for i in idx for p in chunks[i][1]] if with_pair else None  # type: ignore[union-attr]
        # Cut as the offline host cuts (code points), for the same answer both ways.
        cut = host.max_chars
        outputs = host.infer([t[:cut] for t in texts], [p[:cut] for p in pairs] if pairs else None)
        start = 0
        for i in idx:
            end = start + len(chunks[i][0])
            results[i] = [out[start:end] for out in outputs]
            start = end
    return results


def _member_latency() -> Any:
    from ray.util import metrics

    return metrics.Histogram(
        "ensemble_member_forward_s",
        description="Seconds per member forward pass inside an ensemble host.",
        boundaries=LATENCY_BOUNDARIES,
        tag_keys=("member",),
    )


def _unavailable(exc: BaseException) -> bool:
    """Ray's own failures (a replica gone, a queue full, a timeout), not the input's."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(
        exc,
        (RayActorError, BackPressureError, DeploymentUnavailableError, asyncio.TimeoutError),
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

    async def infer(self, chunks: list[Chunk]) -> list[list[np.ndarray]]:
        """The chunks of one ensemble batch in; per chunk, one array per member out."""
        return await self.linger.call(chunks)

    @serve.batch(batch_size_fn=_call_texts)
    async def _batched(self, calls: list[list[Chunk]]) -> list[list[list[np.ndarray]]]:
        flat = [chunk for call in calls for chunk in call]
        out = run_chunks(self.host, flat)  # on the user-code loop, as in EnsembleServer
        answers, start = [], 0
        for call in calls:
            answers.append(out[start : start + len(call)])
            start += len(call)
        return answers


app = FastAPI(
    title="ray-ensemble",
    description="An ensemble of Transformer models behind one endpoint.",
)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors()) or [{"loc": (), "msg": "invalid body", "type": ""}]
    if errors[0].get("type") == "json_invalid":
        return error_response(422, "body is not valid JSON", "invalid_json")
    # An input is a string or an object: report on the branch the client meant.
    for item in errors:
        loc = tuple(item["loc"])
        if "str" in loc and isinstance(item.get("input"), dict):
            continue
        msg = item["msg"]
        if item.get("type") == "string_unicode":  # a key or value pydantic cannot read
            msg = "a key or text holds a lone surrogate (not valid Unicode); send valid Unicode"
        elif "str" in loc:
            msg = 'expected a string or an object {"text": ..., "text_pair": ...}'
        return error_response(422, f"{_loc(loc)}: {msg}", "invalid_input")
    return error_response(422, "invalid body", "invalid_input")


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI answers a body it cannot parse at all (json.loads hitting its recursion
    # limit on deep nesting, say) with a bare 400 {"detail"}: keep to our error format.
    if exc.status_code == 400:
        return error_response(
            422, "body is not valid JSON, or is nested too deeply to read", "invalid_json"
        )
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), kind)


def _bad_text(text: str) -> str | None:
    """Why a text cannot be tokenised, when it is plain to see."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
            f"{exc.start}; send valid Unicode"
        )
    return None


class EnsembleServer:
    """The HTTP endpoint and the shared ensemble host, in one replica.

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
        from ray.util import metrics

        self.plan = plan
        self.cfg = plan.config
        self.limits = plan.config.serve
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
        self.waiting = 0
        self.slots = asyncio.Semaphore(self.limits.max_ongoing_requests)
        app.state.max_body_bytes = self.limits.max_body_bytes  # read by _BodyLimit
        self.linger = Linger(
            self._batched, self.limits.max_batch_size, self.limits.batch_wait_timeout_s
        )
        self.agreement = metrics.Histogram(
            "ensemble_agreement",
            description="Agreement of the members with the ensemble label, per prediction.",
            boundaries=[0.001, 0.25, 0.5, 0.75, 0.999],
        )
        self.rows = metrics.Counter(
            "ensemble_rows_total", description="Texts scored (classification)."
        )
        self.disagreed = metrics.Counter(
            "ensemble_disagreed_rows_total",
            description="Texts where some voting member's top label differs from the "
            "ensemble's; divide by ensemble_rows_total for the share.",
        )

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every member has loaded its model, 503 before.

        This replica's own members are loaded before it takes any request."""

        async def ready(handle: DeploymentHandle) -> bool:
            try:
                return await asyncio.wait_for(
                    handle.options(method_name="ready").remote(), timeout=1.0
                )
            except Exception:  # not started yet, still loading, or gone
                return False

        states = await asyncio.gather(*(ready(h) for _, h in self.remote))
        waiting = [
            m for (names, _), ok in zip(self.remote, states, strict=True) if not ok for m in names
        ]
        if waiting:
            return error_response(503, f"members not ready: {waiting}", "not_ready")
        return JSONResponse({"status": "ok", "members": [m.name for m in self.cfg.members]})

    @app.get("/v1/ensemble")
    async def ensemble(self) -> dict:
        """What this endpoint runs."""
        return {
            "name": self.cfg.name,
            "task": self.cfg.task,
            "labels": self.cfg.labels,
            "members": [
                {"name": m.name, "model": m.model, "weight": m.weight, "temperature": m.temperature}
                for m in self.cfg.members
            ],
            "combine": self.cfg.reducer.combine,
        }

    @app.post("/v1/predict")
    async def predict(self, payload: PredictRequest) -> JSONResponse:
        """Score texts: the ensemble label, probabilities, uncertainty and each member."""
        return await self._predict(payload)

    def _check(self, payload: PredictRequest) -> tuple[list[str], list[str | None]] | JSONResponse:
        limits = self.limits
        if not payload.inputs:
            return error_response(422, "inputs: give at least one text", "invalid_input")
        if len(payload.inputs) > limits.max_inputs:
            return error_response(
                413,
                f"inputs: {len(payload.inputs)} inputs, the limit is {limits.max_inputs} "
                "(serve.max_inputs); split the request",
                "too_many_inputs",
            )
        texts: list[str] = []
        pairs: list[str | None] = []
        for i, item in enumerate(payload.inputs):
            text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
            for what, value in (("text", text), ("text_pair", pair)):
                if value is None:
                    continue
                if not value.strip():
                    return error_response(422, f"inputs[{i}]: {what} is empty", "invalid_input")
                if len(value) > limits.max_text_chars:
                    return error_response(
                        413,
                        f"inputs[{i}]: {what} has {len(value)} characters, the limit is "
                        f"{limits.max_text_chars} (serve.max_text_chars)",
                        "text_too_long",
                    )
            texts.append(text)
            pairs.append(pair)
        return texts, pairs

    async def _predict(self, payload: PredictRequest) -> JSONResponse:
        checked = self._check(payload)
        if isinstance(checked, JSONResponse):
            return checked
        texts, pairs = checked
        # Admission: a bounded queue, then a quick 503, rather than a pile-up.
        if self.slots.locked() and self.waiting >= self.limits.max_queued_requests:
            return error_response(
                503, "overloaded: too many requests in flight; retry later", "overloaded"
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            answers = await asyncio.wait_for(
                self._score(texts, pairs), timeout=self.limits.request_timeout_s
            )
        except asyncio.TimeoutError:
            return error_response(503, "timed out waiting for the members; retry later", "timeout")
        finally:
            self.slots.release()
        predictions: list[dict] = []
        offset = 0
        for chunk, answer in answers:
            if isinstance(answer, BaseException):
                return self._failure(answer, texts, pairs, offset, len(chunk[0]))
            predictions += answer
            offset += len(chunk[0])
        return JSONResponse({"predictions": predictions})

    def _failure(
        self, exc: BaseException, texts: list[str], pairs: list[str | None], offset: int, n: int
    ) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, UnscorableText):
            for i in range(offset, offset + n):
                for what, value in (("text", texts[i]), ("text_pair", pairs[i])):
                    why = _bad_text(value) if value is not None else None
                    if why:
                        return error_response(422, f"inputs[{i}]: {what} {why}", "invalid_input")
            return error_response(
                422, f"inputs: the members cannot tokenise this input: {exc}", "invalid_input"
            )
        if isinstance(exc, BackPressureError):
            return error_response(
                503, "overloaded: a member's queue is full; retry later", "overloaded"
            )
        if _unavailable(exc):
            return error_response(
                503, f"a member is unavailable ({type(exc).__name__}); retry later", "unavailable"
            )
        logger.error("scoring failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal")

    async def _score(
        self, texts: list[str], pairs: list[str | None]
    ) -> list[tuple[Chunk, list[dict] | BaseException]]:
        size = self.limits.max_batch_size
        # At most max_batch_size texts per chunk, all with a pair or all without.
        chunks: list[Chunk] = []
        start = 0
        while start < len(texts):
            has_pair = pairs[start] is not None
            end = start
            while end < len(texts) and end - start < size and (pairs[end] is not None) == has_pair:
                end += 1
            chunk_pairs = pairs[start:end] if has_pair else None
            chunks.append((texts[start:end], chunk_pairs))  # type: ignore[arg-type]
            start = end
        answers = await asyncio.gather(*(self.linger.call(c) for c in chunks))
        return list(zip(chunks, answers, strict=True))

    @serve.batch(batch_size_fn=_chunk_texts)
    async def _batched(self, chunks: list[Chunk]) -> list[list[dict] | BaseException]:
        """One forward per member and one reduce for the chunks of concurrent requests.

        A chunk's failure is its answer, not the batch's: when a batch fails on its
        input, each chunk is run alone, so only the request at fault gets its 422.
        """
        try:
            return await self._run(chunks)
        except Exception as exc:
            if len(chunks) == 1 or _unavailable(exc):
                return [exc] * len(chunks)
        answers: list[list[dict] | BaseException] = []
        for chunk in chunks:
            try:
                answers += await self._run([chunk])
            except Exception as exc:
                answers.append(exc)
        return answers

    async def _run(self, chunks: list[Chunk]) -> list[list[dict]]:
        calls = [h.infer.remote(chunks) for _, h in self.remote]
        per_chunk: list[list[np.ndarray]] = [[] for _ in chunks]
        names: list[str] = []
        if self.host is not None:
            # On the event loop Serve runs user code on (its own thread, apart from the
            # loop that answers Serve's health checks): a hop to a worker thread cost
            # more than it gave (docs/benchmarks.md), and requests that arrive meanwhile
            # simply form the next batch.
            local = run_chunks(self.host, chunks)
            names += self.local
            for i, outs in enumerate(local):
                per_chunk[i] += outs
        for (members, _), result in zip(self.remote, await asyncio.gather(*calls), strict=True):
            names += members
            for i, outs in enumerate(result):
                per_chunk[i] += outs
        outputs = {
            name: np.concatenate([outs[k] for outs in per_chunk]) for k, name in enumerate(names)
        }
        predictions = self._format(outputs, _chunk_texts(chunks))
        answers, start = [], 0
        for texts, _ in chunks:
            answers.append(predictions[start : start + len(texts)])
            start += len(texts)
        return answers

    def _format(self, outputs: dict[str, np.ndarray], n: int) -> list[dict]:
        cfg = self.cfg
        if cfg.task == "embedding":
            columns: dict[str, pa.Array] = {"error": pa.nulls(n, pa.string())}
            for name, values in outputs.items():
                flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
                columns[member_output_column(name)] = pa.FixedSizeListArray.from_arrays(
                    flat, values.shape[1]
                )
            rows = reduce_batch(pa.table(columns), plan=self.plan).to_pylist()
            return [{"embedding": r["embedding"]} for r in rows]
        # The reducer on the arrays, not through an Arrow table: the same math as
        # reduce_batch (reduce_members), without a millisecond of conversions per batch.
        red = reduce_members([outputs[m.name] for m in cfg.members], plan=self.plan)
        labels = cfg.labels or []
        # float32 first, as the offline Parquet stores probabilities, so both agree.
        probs = red.probs.astype(np.float32).tolist()
        member_probs = [p.astype(np.float32).tolist() for p in red.member_probs]
        member_labels = [[labels[int(member_top(row))] for row in p] for p in red.member_probs]
        label_idx, scores = red.label.tolist(), red.score.tolist()
        agreement, entropy = red.agreement.tolist(), red.entropy.tolist()
        preds = []
        scored = disagreed = 0
        for i in range(n):
            if red.error[i] is not None:  # e.g. a member returned non-finite logits
                preds.append({"label": None, "score": None, "probs": None, "error": red.error[i]})
                continue
            scored += 1
            disagreed += agreement[i] < 1.0 - 1e-9
            self.agreement.observe(agreement[i])
            pred = {
                "label": labels[label_idx[i]],
                "score": scores[i],
                "probs": dict(zip(labels, probs[i], strict=True)),
                "agreement": agreement[i],
                "entropy": entropy[i],
            }
            if cfg.reducer.output_members:
                pred["members"] = {
                    m.name: {
                        "label": member_labels[k][i],
                        # A label the member lacks is null, not a silent zero.
                        "probs": {
                            lab: (None if math.isnan(v) else v)
                            for lab, v in zip(labels, member_probs[k][i], strict=True)
                        },
                    }
                    for k, m in enumerate(cfg.members)
                }
            preds.append(pred)
        self.rows.inc(scored)
        if disagreed:
            self.disagreed.inc(disagreed)
        return preds


class _BodyLimit:
    """413 for a body over serve.max_body_bytes, before it is parsed.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs a task group per
    request, which shows on the ingress's CPU under load.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limit = getattr(app.state, "max_body_bytes", None)  # set by Ingress.__init__
        if scope["type"] != "http" or scope["method"] != "POST" or limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                await _too_large(int(declared), limit, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # Chunked: read up to the limit, then replay the body to the app.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                await _too_large(size, limit, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(size: int, limit: int, scope: dict, receive: Any, send: Any) -> None:
    response = error_response(
        413, f"body is {size} bytes, the limit is {limit} (serve.max_body_bytes)", "body_too_large"
    )
    await response(scope, receive, send)


app.add_middleware(_BodyLimit)


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
    # Serve hands the replica far more requests than it works on: the replica queues
    # and sheds load itself, quickly and with a JSON 503, so Serve's own plain-text
    # rejections only come at ten times the configured load. (Serve counts a request
    # as queued while it picks a replica, so its queue limit must not be tight.)
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
