"""The HTTP layer: the FastAPI app, request parsing, limits, error mapping and routes.

Every route is a method of :class:`HttpApi`; the Serve deployment
(:class:`pipelines.online.deployments.EnsembleServer`) subclasses it and supplies the
core, :meth:`HttpApi.score` (texts in, the task's scored rows out), the same host call
and ``plan.task.reduce`` as an offline window. Three wire formats share that core:

- ``POST /v1/predict``: ours (``{"inputs": [...]}`` → ``{"predictions": [...]}``);
- the Open Inference Protocol (KServe V2 REST) under ``/v2`` (:mod:`.protocols`);
- ``POST /v1/embeddings``, OpenAI style, for embedding ensembles.

Errors are ``{"error": message, "type": kind}``: 422 malformed, 413 too large, 404
unknown model, 503 overloaded, timed out or not ready; never a 500 for bad input. A body
is read raw and its size bounded (bytes, then the number of inputs) before any item is
validated: a 1 MB body of 500,000 items is refused after reading ``max_inputs + 1`` of
them, not after a million error objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from actors.tasks.base import MISSING_FIELD
from pipelines.online import protocols
from pipelines.online.protocols import HEADER_LENGTH, ApiError, check_text, invalid, load_json

if TYPE_CHECKING:
    from pipelines.config import ServeConfig
    from pipelines.plan import EnsemblePlan

__all__ = [
    "ApiError",
    "HttpApi",
    "PairInput",
    "PredictRequest",
    "app",
    "error_response",
    "parse_predict",
]

logger = logging.getLogger(__name__)


class PairInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., description="The text to score.")
    text_pair: str | None = Field(None, description="Optional second segment (NLI, pairs).")


class WordsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: list[str] = Field(
        ..., description="Pre-split words (token_classification ensembles only)."
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str | PairInput | WordsInput] = Field(
        ...,
        description="Texts, {text, text_pair} objects, or (token_classification) "
        "{words: [...]} objects; at most serve.max_inputs of them.",
        examples=[["a fine film", "a dull plot"]],
    )


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request (for the OpenAPI page; parsed by :mod:`.protocols`)."""

    model: str = Field(..., description="The ensemble's name.")
    input: str | list[str] = Field(..., description="A text or texts (at most serve.max_inputs).")
    encoding_format: str = Field("float", description="float | base64 (float32 bytes)")
    dimensions: int | None = Field(None, description="If given, must be the embedding's size.")
    user: str | None = Field(None, description="Ignored.")


class ErrorResponse(JSONResponse):
    """``{"error", "type"}``, ASCII-escaped: a message may quote a client's key or text,
    and a lone surrogate in it must not turn a 4xx into a 500 while encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return ErrorResponse({"error": message, "type": kind}, status_code=status)


def _inline_refs(schema: dict) -> dict:
    """A model's JSON schema with its ``$defs`` inlined, to sit in an OpenAPI path."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _json_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that reads its body raw: the docs still show it."""
    schema = _inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# --- /v1/predict parsing -------------------------------------------------------------------


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "PairInput", "WordsInput"):
            continue  # union branch names say nothing to a client
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _invalid_predict(exc: ValidationError) -> ApiError:
    """The first error, on the branch of ``str | PairInput`` the client meant."""
    for item in exc.errors():
        loc = tuple(item["loc"])
        if "str" in loc and isinstance(item.get("input"), dict):
            continue
        given = item.get("input")
        if "WordsInput" in loc and not (isinstance(given, dict) and "words" in given):
            continue
        if "PairInput" in loc and isinstance(given, dict) and "words" in given:
            continue
        msg = item["msg"]
        if item.get("type") == "string_unicode":  # a key or value pydantic cannot read
            msg = "a key or text holds a lone surrogate (not valid Unicode); send valid Unicode"
        elif "str" in loc:
            msg = 'expected a string or an object {"text": ..., "text_pair": ...}'
        return invalid(f"{_loc(loc)}: {msg}")
    return invalid("invalid body")


def parse_predict(
    body: bytes, limits: ServeConfig, *, words: bool = False
) -> tuple[list[str | list[str]], list[str | None]]:
    """The texts and pairs of a ``/v1/predict`` body, or an :class:`ApiError`.

    ``words``: the task takes pre-split words; an input ``{"words": [...]}`` gives its
    list in place of a text (else it is a 422).

    Sizes come first: the number of inputs is checked on the parsed list before pydantic
    sees an item, and a longer list is refused after reading ``max_inputs + 1`` of its
    items, not all of them (:func:`.protocols.items_over`)."""
    if protocols.items_over(body, "inputs", limits.max_inputs):
        raise protocols.too_many("inputs", f"more than {limits.max_inputs}", limits.max_inputs)
    doc = load_json(body)
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if isinstance(inputs, list):
        if not inputs:
            raise invalid("inputs: give at least one text")
        if len(inputs) > limits.max_inputs:
            raise protocols.too_many("inputs", len(inputs), limits.max_inputs)
    try:
        payload = PredictRequest.model_validate(doc)
    except ValidationError as exc:
        raise _invalid_predict(exc) from None
    texts: list[str | list[str]] = []
    pairs: list[str | None] = []
    for i, item in enumerate(payload.inputs):
        if isinstance(item, WordsInput):
            if not words:
                raise invalid(
                    f"inputs[{i}]: pre-split words are for token_classification ensembles; "
                    "send the text"
                )
            if not item.words:
                raise invalid(f"inputs[{i}].words is empty")
            for j, word in enumerate(item.words):
                if not word.strip():
                    raise invalid(f"inputs[{i}].words[{j}] is empty")
            check_text(" ".join(item.words), f"inputs[{i}]: words", limits.max_text_chars)
            texts.append(list(item.words))
            pairs.append(None)
            continue
        text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
        check_text(text, f"inputs[{i}]: text", limits.max_text_chars)
        if pair is not None:
            check_text(pair, f"inputs[{i}]: text_pair", limits.max_text_chars)
        texts.append(text)
        pairs.append(pair)
    return texts, pairs


# --- the app -------------------------------------------------------------------------------

app = FastAPI(
    title="ray-ensemble",
    description="An ensemble of Transformer models behind one endpoint: /v1/predict, the "
    "Open Inference Protocol (KServe V2) under /v2, and OpenAI-style /v1/embeddings.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.kind)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Bodies are read raw; this is a path or query parameter FastAPI could not read.
    errors = list(exc.errors()) or [{"loc": (), "msg": "invalid request"}]
    return error_response(
        422, f"{_loc(tuple(errors[0]['loc']))}: {errors[0]['msg']}", "invalid_input"
    )


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), kind)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("request failed", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal")


def unavailable(exc: BaseException) -> bool:
    """Ray's own failures (a replica gone, a queue full, a timeout), not the input's."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(
        exc,
        (RayActorError, BackPressureError, DeploymentUnavailableError, asyncio.TimeoutError),
    )


def _failure(exc: BaseException) -> ApiError:
    """What a client is told when scoring failed."""
    if isinstance(exc, ApiError):
        return exc
    from ray.serve.exceptions import BackPressureError

    from actors.host import UnscorableText

    if isinstance(exc, UnscorableText):
        return invalid(f"inputs: the members cannot tokenise this input: {exc}")
    if isinstance(exc, BackPressureError):
        return ApiError(503, "overloaded: a member's queue is full; retry later", "overloaded")
    if unavailable(exc):
        return ApiError(
            503, f"a member is unavailable ({type(exc).__name__}); retry later", "unavailable"
        )
    logger.error("scoring failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "internal")


class HttpApi:
    """The routes, over one core method that subclasses supply: :meth:`score`.

    Subclasses call ``HttpApi.__init__(self, plan)`` and implement :meth:`score` and
    :meth:`members_not_ready`. Serve's ``serve.ingress(app)`` mounts these inherited
    route methods on the subclass (it matches each route against the class's MRO).
    """

    def __init__(self, plan: EnsemblePlan) -> None:
        self.plan = plan
        self.cfg = plan.config
        self.limits = plan.config.serve
        self.task = plan.task
        self.scoring = 0  # requests between admission and answer, this replica
        self.widths = _widths(plan)  # each output's trailing shape, for the V2 metadata
        # The fewest members an answer may be made from; below the member count, some
        # answers are partial, and V2 answers name what they lack.
        self.quorum = self.limits.min_members or len(self.cfg.members)
        partial = self.quorum < len(self.cfg.members)
        self.v2_output_fields = (*self.task.fields, *((MISSING_FIELD,) if partial else ()))
        if partial:
            self.widths[MISSING_FIELD.name] = ()
        self.v2_names = tuple(f.name for f in protocols.v2_fields(self.v2_output_fields))
        # /v1/embeddings serves the field the task names as its vector, if any.
        self.embedding = self.task.vector_field
        app.state.max_body_bytes = self.limits.max_body_bytes  # read by _BodyLimit

    # --- the core, supplied by the deployment ---

    async def score(self, texts: list[str], pairs: list[str | None] | None) -> Any:
        """The task's ``Scored`` rows for valid texts (``pairs``: None, or one per text)."""
        raise NotImplementedError

    async def members_not_ready(self) -> list[str]:
        """Members whose models are not loaded yet (empty: ready)."""
        return []

    async def _scored(self, texts: list[str], pairs: list[str | None] | None) -> Any:
        """:meth:`score` within the limits, its failures as :class:`ApiError`.

        Serve's ``max_ongoing_requests`` / ``max_queued_requests`` would bound the load,
        but Serve refuses past them with a plain-text 503 from its proxy and times out
        with a plain-text 408 (``request_timeout_s`` is one setting for the whole proxy,
        not one per app). Clients get our JSON instead: the replica refuses past
        ``max_ongoing + max_queued`` requests being scored, and times a request out after
        ``request_timeout_s``; the waiting itself is ``@serve.batch``'s queue, and Serve's
        own limits (set in :func:`build_app`) stay well above ours as a backstop."""
        limits = self.limits
        if self.scoring >= limits.max_ongoing_requests + limits.max_queued_requests:
            raise ApiError(
                503, "overloaded: too many requests in flight; retry later", "overloaded"
            )
        self.scoring += 1
        try:
            scored = await asyncio.wait_for(self.score(texts, pairs), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                503, "timed out waiting for the members; retry later", "timeout"
            ) from None
        except Exception as exc:
            raise _failure(exc) from None
        finally:
            self.scoring -= 1
        for name, values in scored.columns.items():
            if name not in self.widths:
                self.widths[name] = tuple(values.shape[1:])
        return scored

    def _all_valid(self, scored: Any, what: str) -> None:
        """A protocol with no per-row error field answers a row the members could not
        score (non-finite outputs, say) with a 422 for the request."""
        for i, ok in enumerate(scored.valid):
            if not ok:
                raise ApiError(422, f"{what}[{i}]: {scored.error[i]}", "unscorable")

    # --- ours ---

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every member has loaded its model, 503 before."""
        waiting = await self.members_not_ready()
        if waiting:
            return error_response(503, f"members not ready: {waiting}", "not_ready")
        return JSONResponse({"status": "ok", "members": [m.name for m in self.cfg.members]})

    @app.get("/v1/ensemble")
    async def ensemble(self) -> dict:
        """What this endpoint runs: models by name (a hub id with its commit), never the
        paths they were loaded from, which tell clients how the server is laid out."""
        return {
            "name": self.cfg.name,
            "task": self.cfg.task,
            "labels": self.cfg.labels,
            "members": self.plan.member_summaries(),
            "combine": self.cfg.reducer.combine,
        }

    @app.post("/v1/predict", openapi_extra=_json_body(PredictRequest))
    async def predict(self, request: Request) -> JSONResponse:
        """Score texts: the ensemble label, probabilities, uncertainty and each member.

        Body: ``{"inputs": ["text", ...]}`` or ``{"inputs": [{"text", "text_pair"}]}``;
        token_classification also takes ``{"words": [...]}`` inputs."""
        texts, pairs = parse_predict(await request.body(), self.limits, words=self.task.takes_words)
        scored = await self._scored(texts, pairs)
        return JSONResponse({"predictions": self.task.to_json(scored, self.cfg)})

    # --- OpenAI ---

    @app.post("/v1/embeddings", openapi_extra=_json_body(EmbeddingsRequest))
    async def embeddings(self, request: Request) -> JSONResponse:
        """OpenAI-style embeddings (embedding ensembles): ``{"model", "input"}``."""
        if self.embedding is None:
            raise ApiError(
                400,
                f"ensemble {self.cfg.name!r} is a {self.cfg.task} ensemble and gives no "
                f"embeddings; use /v1/predict or /v2/models/{self.cfg.name}/infer",
                "not_supported",
            )
        req = protocols.parse_embeddings(
            await request.body(),
            max_inputs=self.limits.max_inputs,
            max_text_chars=self.limits.max_text_chars,
        )
        self._model(req.model)
        scored = await self._scored(req.texts, None)
        self._all_valid(scored, "input")
        vectors = scored.columns[self.embedding]
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise invalid(
                f"dimensions: {req.dimensions}, but this ensemble's embeddings have "
                f"{vectors.shape[1]}; leave dimensions out"
            )
        tokens = await self.count_tokens(req.texts)
        return JSONResponse(
            protocols.embeddings_response(
                self.cfg.name, vectors, encoding_format=req.encoding_format, tokens=tokens
            )
        )

    async def count_tokens(self, texts: list[str]) -> int:
        """Tokens in ``texts`` for OpenAI's ``usage`` (0 when no tokenizer is at hand)."""
        return 0

    # --- Open Inference Protocol (KServe V2 REST) ---

    def _model(self, name: str) -> None:
        if name != self.cfg.name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this endpoint serves {self.cfg.name!r}",
                "not_found",
            )

    @app.get("/v2")
    async def v2_server(self) -> dict:
        """Server metadata (Open Inference Protocol)."""
        return {"name": "ray-ensemble", "version": _version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live(self) -> Response:
        """200 while the server runs."""
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def v2_ready(self) -> Response:
        """200 once every member is ready, 503 before."""
        waiting = await self.members_not_ready()
        if waiting:
            return error_response(503, f"members not ready: {waiting}", "not_ready")
        return Response(status_code=200)

    @app.get("/v2/models/{name}")
    async def v2_metadata(self, name: str) -> dict:
        """Inputs, outputs (datatypes, shapes) and labels of the ensemble."""
        self._model(name)
        return protocols.v2_model_metadata(
            self.cfg.name,
            self.v2_output_fields,
            self.widths,
            {
                "task": self.cfg.task,
                "labels": self.cfg.labels,
                "max_inputs": self.limits.max_inputs,
            },
        )

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(self, name: str) -> Response:
        """200 once every member is ready, 503 before."""
        self._model(name)
        return await self.v2_ready()

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> Response:
        """Inference: BYTES ``text`` (``[n]`` or ``[n, 1]``) and optionally ``text_pair``;
        JSON or the binary tensor data extension."""
        self._model(name)
        req = protocols.parse_v2_infer(
            await request.body(),
            request.headers.get(HEADER_LENGTH),
            max_inputs=self.limits.max_inputs,
            max_text_chars=self.limits.max_text_chars,
            outputs=self.v2_names,
        )
        scored = await self._scored(req.texts, req.pairs)
        self._all_valid(scored, "text")
        columns = scored.columns
        if MISSING_FIELD in self.v2_output_fields:
            missing = np.empty(scored.rows, dtype=object)
            for i in range(scored.rows):  # one list per row; numpy would stack equal ones
                missing[i] = scored.members_missing(i)
            columns = {**columns, MISSING_FIELD.name: missing}
        tensors = protocols.v2_tensors(columns, self.v2_output_fields, req.outputs)
        body, header = protocols.encode_v2_response(
            model_name=self.cfg.name, tensors=tensors, binary=req.binary, request_id=req.id
        )
        if header is None:
            return Response(body, media_type="application/json")
        return Response(
            body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header)}
        )

    # The same with a version in the path (tritonclient's model_version="1").

    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_version_metadata(self, name: str, version: str) -> dict:
        """Metadata of version 1, the only one."""
        _check_version(version)
        return await self.v2_metadata(name)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_version_ready(self, name: str, version: str) -> Response:
        """Readiness of version 1, the only one."""
        _check_version(version)
        return await self.v2_model_ready(name)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_version_infer(self, name: str, version: str, request: Request) -> Response:
        """Inference with version 1, the only one."""
        _check_version(version)
        return await self.v2_infer(name, request)


def _widths(plan: EnsemblePlan) -> dict[str, tuple[int, ...]]:
    """Each output's trailing shape (``probs``: ``(L,)``), from a reduce of zero rows.

    A width the plan cannot tell (a torch member's, before it runs) is left out and
    learned from the first answer."""
    task, cfg = plan.task, plan.config
    try:
        empty = [np.zeros((0, task.output_width(s, cfg)), np.float32) for s in plan.specs]
        scored = task.reduce(empty, plan=plan)
    except Exception:  # e.g. a stacking model or a width of 0: learn it from a real answer
        return {}
    return {
        name: tuple(values.shape[1:])
        for name, values in scored.columns.items()
        if 0 not in values.shape[1:]
    }


def _check_version(version: str) -> None:
    if version != "1":
        raise ApiError(
            404, f"version {version!r} is unknown; the model has version '1'", "not_found"
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray-ensemble")
    except PackageNotFoundError:
        return "0"


class _BodyLimit:
    """413 for a body over serve.max_body_bytes, before it is parsed.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs a task group per
    request, which shows on the ingress's CPU under load.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limit = getattr(app.state, "max_body_bytes", None)  # set by HttpApi.__init__
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
