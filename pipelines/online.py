"""Online scoring on Ray Serve: one deployment per member, one HTTP ingress that fans out.

Members batch requests dynamically (``@serve.batch``); the ingress validates the
request, calls every member concurrently and reduces with the same ``reduce_batch`` as
the offline pipeline, so the same text gets the same answer online and offline.

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
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.host import reduce_batch
from actors.member import MemberHost, member_output_column
from actors.reducer import member_top
from pipelines.plan import LIGHT_TASK_CPUS, EnsemblePlan, hosts_on_cluster, plan_ensemble

__all__ = ["Ingress", "MemberServer", "app_builder", "build_app"]

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


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


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)


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


def _bundle_texts(bundles: list[list[Chunk]]) -> int:
    return sum(_chunk_texts(bundle) for bundle in bundles)


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


class MemberServer:
    """A member as a Serve deployment: the offline MemberHost behind ``@serve.batch``.

    Each call carries a bundle of chunks from one ingress batch; the batch size counts
    texts, not calls.
    """

    def __init__(
        self,
        *,
        member: Any,
        spec: Any,
        task: str,
        num_labels: int,
        threads: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        from ray.util import metrics

        self.name = member.name
        self.host = MemberHost(
            member=member,
            spec=spec,
            task=task,
            num_labels=num_labels,
            text_column="text",
            threads=threads,
        )
        self.linger = Linger(self._batched, max_batch_size, batch_wait_timeout_s)
        self.latency = metrics.Histogram(
            "ensemble_member_latency_s",
            description="Seconds per member forward batch.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("member",),
        )
        self.batch_size = metrics.Histogram(
            "ensemble_member_batch_size",
            description="Texts per member forward batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("member",),
        )
        self.latency.set_default_tags({"member": self.name})
        self.batch_size.set_default_tags({"member": self.name})

    async def ready(self) -> bool:
        return True

    def _run(self, chunks: list[Chunk]) -> list[np.ndarray]:
        started = time.perf_counter()
        results: list[np.ndarray] = [np.empty(0)] * len(chunks)
        # Calls with and without a text pair cannot share one tokenizer call.
        for with_pair in (False, True):
            idx = [i for i, (_, pairs) in enumerate(chunks) if (pairs is not None) == with_pair]
            if not idx:
                continue
            texts = [t for i in idx for t in chunks[i][0]]
            pairs = [p for i in idx for p in chunks[i][1]] if with_pair else None
            out = self.host.infer(texts, pairs)
            start = 0
            for i in idx:
                results[i] = out[start : start + len(chunks[i][0])]
                start += len(chunks[i][0])
        self.latency.observe(time.perf_counter() - started)
        self.batch_size.observe(sum(len(c[0]) for c in chunks))
        return results

    async def predict(self, bundle: list[Chunk]) -> list[np.ndarray]:
        """A bundle of chunks (one ingress batch) in; one array of outputs per chunk out."""
        return await self.linger.call(bundle)

    @serve.batch(batch_size_fn=_bundle_texts)
    async def _batched(self, bundles: list[list[Chunk]]) -> list[list[np.ndarray]]:
        flat = [chunk for bundle in bundles for chunk in bundle]
        # Off the event loop, so health checks and new requests are taken meanwhile.
        out = await asyncio.to_thread(self._run, flat)
        answers, start = [], 0
        for bundle in bundles:
            answers.append(out[start : start + len(bundle)])
            start += len(bundle)
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
        if "str" in loc:
            msg = 'expected a string or an object {"text": ..., "text_pair": ...}'
        return error_response(422, f"{_loc(loc)}: {msg}", "invalid_input")
    return error_response(422, "invalid body", "invalid_input")


class Ingress:
    """The HTTP front: validation, admission, fan-out, reduction."""

    def __init__(self, plan: EnsemblePlan, members: list[DeploymentHandle]) -> None:
        from ray.util import metrics

        self.plan = plan
        self.cfg = plan.config
        self.limits = plan.config.serve
        self.handles = dict(zip((m.name for m in plan.config.members), members, strict=True))
        self.active = 0
        self.waiting = 0
        self.slots = asyncio.Semaphore(self.limits.max_ongoing_requests)
        app.state.max_body_bytes = self.limits.max_body_bytes  # read by _limit_body
        self.linger = Linger(
            self._gather, self.limits.max_batch_size, self.limits.batch_wait_timeout_s
        )
        self.agreement = metrics.Histogram(
            "ensemble_agreement",
            description="Agreement of the members with the ensemble label, per prediction.",
            boundaries=[0.001, 0.25, 0.5, 0.75, 0.999],
        )
        self.requests = metrics.Counter(
            "ensemble_requests_total",
            description="Predict requests by HTTP status.",
            tag_keys=("status",),
        )

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every member has loaded its model, 503 before."""

        async def ready(handle: DeploymentHandle) -> bool:
            try:
                return await asyncio.wait_for(handle.ready.remote(), timeout=1.0)
            except Exception:  # not started yet, still loading, or gone
                return False

        states = await asyncio.gather(*(ready(h) for h in self.handles.values()))
        waiting = [name for name, ok in zip(self.handles, states, strict=True) if not ok]
        if waiting:
            return error_response(503, f"members not ready: {waiting}", "not_ready")
        return JSONResponse({"status": "ok", "members": list(self.handles)})

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
        response = await self._predict(payload)
        self.requests.inc(tags={"status": str(response.status_code)})
        return response

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
            predictions = await asyncio.wait_for(
                self._score(texts, pairs), timeout=self.limits.request_timeout_s
            )
        except asyncio.TimeoutError:
            return error_response(503, "timed out waiting for the members; retry later", "timeout")
        except Exception as exc:  # a member rejected (backpressure) or is gone
            from ray.serve.exceptions import BackPressureError

            if isinstance(exc, BackPressureError):
                return error_response(
                    503, "overloaded: a member's queue is full; retry later", "overloaded"
                )
            return error_response(
                503, f"a member is unavailable: {type(exc).__name__}", "unavailable"
            )
        finally:
            self.slots.release()
        return JSONResponse({"predictions": predictions})

    async def _score(self, texts: list[str], pairs: list[str | None]) -> list[dict]:
        size = self.limits.max_batch_size
        # One call per chunk of at most max_batch_size texts with the same kind (pair or not).
        chunks: list[tuple[int, int, list[str], list[str] | None]] = []
        start = 0
        while start < len(texts):
            has_pair = pairs[start] is not None
            end = start
            while end < len(texts) and end - start < size and (pairs[end] is not None) == has_pair:
                end += 1
            chunk_pairs = pairs[start:end] if has_pair else None
            chunks.append((start, end, texts[start:end], chunk_pairs))  # type: ignore[arg-type]
            start = end
        answers = await asyncio.gather(*(self.linger.call((t, p)) for *_, t, p in chunks))
        return [prediction for answer in answers for prediction in answer]

    @serve.batch(batch_size_fn=_chunk_texts)
    async def _gather(self, chunks: list[Chunk]) -> list[list[dict]]:
        """One call per member, and one reduce, for the chunks of concurrent requests.

        Coalescing here, not only in the members, saves three handle calls and a reduce
        per request under load: on small models those cost more than the forward pass.
        """
        results = await asyncio.gather(*(h.predict.remote(chunks) for h in self.handles.values()))
        outputs = {
            name: np.concatenate(out) for name, out in zip(self.handles, results, strict=True)
        }
        predictions = self._format(outputs, sum(len(texts) for texts, _ in chunks))
        answers, start = [], 0
        for texts, _ in chunks:
            answers.append(predictions[start : start + len(texts)])
            start += len(texts)
        return answers

    def _format(self, outputs: dict[str, np.ndarray], n: int) -> list[dict]:
        columns: dict[str, pa.Array] = {"error": pa.nulls(n, pa.string())}
        for name, values in outputs.items():
            width = values.shape[1]
            flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
            columns[member_output_column(name)] = pa.FixedSizeListArray.from_arrays(flat, width)
        rows = reduce_batch(pa.table(columns), plan=self.plan).to_pylist()
        cfg = self.cfg
        if cfg.task == "embedding":
            return [{"embedding": r["embedding"]} for r in rows]
        labels = cfg.labels or []
        preds = []
        for row in rows:
            if row["error"] is not None:  # e.g. a member returned non-finite logits
                preds.append({"label": None, "score": None, "probs": None, "error": row["error"]})
                continue
            self.agreement.observe(row["agreement"])
            pred = {
                "label": row["label"],
                "score": row["score"],
                "probs": dict(zip(labels, row["probs"], strict=True)),
                "agreement": row["agreement"],
                "entropy": row["entropy"],
            }
            if cfg.reducer.output_members:
                members = {}
                for m in cfg.members:
                    p = row[f"probs__{m.name}"]
                    members[m.name] = {
                        "label": labels[int(member_top(np.asarray(p, dtype=float)))],
                        # A label the member lacks is null, not a silent zero.
                        "probs": {
                            lab: (None if math.isnan(v) else v)
                            for lab, v in zip(labels, p, strict=True)
                        },
                    }
                pred["members"] = members
            preds.append(pred)
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


IngressDeployment = serve.deployment(serve.ingress(app)(Ingress), name="ingress")
MemberDeployment = serve.deployment(MemberServer, name="member")


def build_app(plan: EnsemblePlan, *, cpu_fallback: bool = False) -> serve.Application:
    """The Serve application for an ensemble. Ray must be running (its shape sets CPUs).

    ``cpu_fallback``: run GPU members on CPU when Ray has none (a local Ray)."""
    cfg = plan.config
    limits = cfg.serve
    resources = hosts_on_cluster(cfg, cpu_fallback=cpu_fallback, colocate=False)
    members = []
    for member, spec, res in zip(cfg.members, plan.specs, resources, strict=True):
        options: dict[str, Any] = {
            "name": f"member_{member.name}",
            "ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
            # Enough calls in flight that a full batch can form.
            "max_ongoing_requests": max(2 * limits.max_batch_size, 16),
            "max_queued_requests": max(limits.max_queued_requests * 4, 64),
        }
        if res.min_replicas == res.max_replicas:
            options["num_replicas"] = res.min_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": res.min_replicas,
                "max_replicas": res.max_replicas,
                "target_ongoing_requests": max(limits.max_batch_size, 2),
            }
        members.append(
            MemberDeployment.options(**options).bind(
                member=member.model_copy(update={"num_gpus": res.num_gpus}),
                spec=spec,
                task=cfg.task,
                num_labels=cfg.num_labels,
                threads=res.threads,
                max_batch_size=limits.max_batch_size,
                batch_wait_timeout_s=limits.batch_wait_timeout_s,
            )
        )
    return IngressDeployment.options(
        num_replicas=limits.ingress_replicas,
        ray_actor_options={"num_cpus": LIGHT_TASK_CPUS},
        # Serve hands the ingress far more requests than it works on: the ingress queues
        # and sheds load itself, quickly and with a JSON 503, so Serve's own plain-text
        # rejections only come at ten times the configured load. (Serve counts a request
        # as queued while it picks a replica, so its queue limit must not be tight.)
        max_ongoing_requests=10 * (limits.max_ongoing_requests + limits.max_queued_requests),
        max_queued_requests=10 * (limits.max_ongoing_requests + limits.max_queued_requests),
    ).bind(plan, members)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run`` / ``serve deploy``: ``import_path: pipelines.online:app_builder``,
    ``args: {config: path/to/ensemble.yaml}`` (and ``cpu_fallback: true`` to run GPU
    members on CPU where Ray has no GPU)."""
    from pipelines.config import load_config

    if "config" not in args:
        raise ValueError("app_builder needs the argument `config`: the ensemble YAML path")
    plan = plan_ensemble(load_config(args["config"]))
    return build_app(plan, cpu_fallback=bool(args.get("cpu_fallback", False)))
