"""The wire formats the endpoint speaks besides ``/v1/predict``, as pure functions.

- **Open Inference Protocol** (KServe V2 REST, what Triton, KServe, Seldon/MLServer and
  TorchServe speak): inference requests in the JSON form and in the binary tensor data
  extension (``Inference-Header-Content-Length``), model metadata, responses.
- **OpenAI embeddings** (``POST /v1/embeddings``): requests and responses, float or
  base64.

No Serve, no FastAPI, no model: bytes and numpy in, bytes and dicts out, so each codec
is tested against the real clients' encoders (``tests/test_protocols.py``). Every parser
checks sizes (tensor shapes, list lengths) before it reads the items, and a list longer
than ``serve.max_inputs`` is refused after reading ``max_inputs + 1`` of its items
(:func:`items_over`, :func:`v2_rows_over`), not after parsing the whole body.

Example::

    from pipelines.online.protocols import parse_v2_infer

    req = parse_v2_infer(
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
        None,
        max_inputs=64,
        max_text_chars=20_000,
        outputs=("label", "score"),
    )
    assert req.texts == ["a"] and req.pairs is None
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "HEADER_LENGTH",
    "ApiError",
    "EmbeddingsRequest",
    "V2Request",
    "V2Tensor",
    "check_text",
    "decode_bytes_tensor",
    "embeddings_response",
    "encode_bytes_tensor",
    "encode_v2_response",
    "load_json",
    "parse_embeddings",
    "parse_v2_infer",
    "v2_model_metadata",
    "v2_rows_over",
    "v2_tensors",
]

#: The binary tensor data extension's header: the JSON part's length in bytes.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: V2 datatypes the endpoint answers in, and their little-endian numpy types.
V2_NUMPY = {
    "BOOL": np.dtype("?"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

#: The inputs of every model: one text per row, and optionally a second segment.
TEXT, TEXT_PAIR = "text", "text_pair"


class ApiError(Exception):
    """A request the endpoint answers with ``{"error": message, "type": kind}``.

    ``status``: 422 malformed, 413 too large, 404 unknown model, 503 overloaded."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def invalid(message: str) -> ApiError:
    return ApiError(422, message, "invalid_input")


def load_json(body: bytes) -> Any:
    """``json.loads`` with our errors: 422 ``invalid_json``, never a 500."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(422, "body is nested too deeply to read", "invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "body is not valid JSON", "invalid_json") from None


def too_many(what: str, n: int | str, limit: int) -> ApiError:
    return ApiError(
        413,
        f"{what}: {n} inputs, the limit is {limit} (serve.max_inputs); split the request",
        "too_many_inputs",
    )


# --- sizes before items ---------------------------------------------------------------
#
# ``json.loads`` of a 1 MB array of 500,000 zeros takes 15-30 ms on a small machine, and
# the replica's event loop waits meanwhile. These checks walk the body one value at a
# time with the C decoder's ``raw_decode`` and stop at item ``limit + 1`` of an array
# that must not be longer (a body broken after that is still too many inputs). Anything
# unexpected before that (not an object, bad JSON, another shape) answers "not over": the
# full parse then says what is wrong.

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class _Over(Exception):
    """Raised inside a walk: ``what`` holds more than the limit."""

    def __init__(self, what: str) -> None:
        self.what = what


def _ws(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()  # type: ignore[union-attr]


def _walk(text: str, i: int, visit: Any) -> int:
    """Walk the object at ``text[i]``; ``visit(key, j)`` sees each value's start and
    returns the index after it, or None to have it skipped. Returns the index after the
    object."""
    if text[i : i + 1] != "{":
        raise ValueError("not an object")
    i = _ws(text, i + 1)
    if text[i : i + 1] == "}":
        return i + 1
    while True:
        if text[i : i + 1] != '"':
            raise ValueError("not a key")
        key, i = _DECODER.raw_decode(text, i)
        i = _ws(text, i)
        if text[i : i + 1] != ":":
            raise ValueError("no colon")
        i = _ws(text, i + 1)
        end = visit(key, i)
        i = _ws(text, _DECODER.raw_decode(text, i)[1] if end is None else end)
        if text[i : i + 1] == "}":
            return i + 1
        if text[i : i + 1] != ",":
            raise ValueError("no comma")
        i = _ws(text, i + 1)


def _longer(text: str, i: int, limit: int) -> bool:
    """Whether the array at ``text[i]`` has more than ``limit`` items, reading at most
    ``limit + 1`` of them."""
    i = _ws(text, i + 1)
    if text[i : i + 1] == "]":
        return False
    for _ in range(limit):
        _, i = _DECODER.raw_decode(text, i)
        i = _ws(text, i)
        if text[i : i + 1] != ",":
            return False
        i = _ws(text, i + 1)
    _DECODER.raw_decode(text, i)  # item limit + 1; what follows it is not read
    return True


def _decode(body: bytes) -> str | None:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _over(text: str, visit: Any) -> str | None:
    """What ``visit`` found over its limit while walking the top-level object, if any."""
    try:
        _walk(text, _ws(text, 0), visit)
    except _Over as over:
        return over.what
    except (ValueError, RecursionError):
        pass
    return None


def items_over(body: bytes, key: str, limit: int) -> bool:
    """Whether the body's top-level ``key`` is an array of more than ``limit`` items,
    found by reading at most ``limit + 1`` of them."""
    text = _decode(body)
    if text is None:
        return False

    def visit(name: str, i: int) -> None:
        if name == key and text[i : i + 1] == "[" and _longer(text, i, limit):
            raise _Over(key)

    return _over(text, visit) is not None


def v2_rows_over(header: bytes, limit: int) -> str | None:
    """The input of a V2 request's JSON header that declares (``shape``) or holds
    (``data``) more than ``limit`` rows, found without reading its data past row
    ``limit + 1``; None when none does (or the header is not what it should be)."""
    text = _decode(header)
    if text is None:
        return None

    def tensor(name: list[str]) -> Any:
        def visit(key: str, i: int) -> int | None:
            if key == "name" and text[i : i + 1] == '"':
                value, end = _DECODER.raw_decode(text, i)
                name[0] = str(value)
                return end
            if key == "shape":
                shape, end = _DECODER.raw_decode(text, i)
                if isinstance(shape, list) and shape and isinstance(shape[0], int):
                    if shape[0] > limit:
                        raise _Over(name[0])
                return end
            if key == "data" and text[i : i + 1] == "[" and _longer(text, i, limit):
                raise _Over(name[0])
            return None

        return visit

    def top(key: str, i: int) -> int | None:
        if key != "inputs" or text[i : i + 1] != "[":
            return None
        i = _ws(text, i + 1)
        for _ in range(4):  # a text and a pair; more is an error the full parse names
            if text[i : i + 1] != "{":
                return None
            i = _ws(text, _walk(text, i, tensor(["inputs"])))
            if text[i : i + 1] == "]":
                return i + 1
            if text[i : i + 1] != ",":
                return None
            i = _ws(text, i + 1)
        return None

    return _over(text, top)


def check_text(value: str, where: str, max_text_chars: int) -> None:
    """Refuse a text the members cannot score: empty, too long, or not valid Unicode.

    ``where`` names it in the message, e.g. ``"inputs[3]: text"``."""
    if not value.strip():
        raise invalid(f"{where} is empty")
    if len(value) > max_text_chars:
        raise ApiError(
            413,
            f"{where} has {len(value)} characters, the limit is {max_text_chars} "
            "(serve.max_text_chars)",
            "text_too_long",
        )
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON's "\ud800" escape reads as a lone surrogate; no tokenizer takes one.
        raise invalid(
            f"{where} holds a lone surrogate (U+{ord(value[exc.start]):04X}) at character "
            f"{exc.start}; send valid Unicode"
        ) from None


# --- Open Inference Protocol (KServe V2) ------------------------------------------------


class OutputFieldLike(Protocol):
    """What the codecs read of a task's output field (``actors.tasks.base.OutputField``)."""

    name: str
    member: bool
    v2_datatype: str | None


@dataclass(frozen=True)
class V2Request:
    """A parsed inference request: the texts, and which outputs to send how.

    ``outputs``: the requested output names in order, or None for every output.
    ``binary``: the outputs to send in the binary extension."""

    texts: list[str]
    pairs: list[str] | None
    outputs: tuple[str, ...] | None
    binary: frozenset[str]
    binary_default: bool = False
    id: str | None = None


@dataclass(frozen=True)
class V2Tensor:
    """An output tensor: ``data`` holds str (BYTES) or numbers, in its final shape."""

    name: str
    datatype: str
    data: np.ndarray = field(repr=False)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


def encode_bytes_tensor(values: Sequence[str | bytes]) -> bytes:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then
    its bytes (UTF-8 for text)."""
    parts = []
    for value in values:
        raw = value.encode("utf-8") if isinstance(value, str) else value
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode_bytes_tensor(raw: bytes | memoryview, n: int, name: str) -> list[str]:
    """``n`` UTF-8 texts from a binary BYTES tensor; 422 when it does not hold exactly that."""
    texts: list[str] = []
    view = memoryview(raw)
    offset = 0
    for i in range(n):
        if offset + 4 > len(view):
            raise invalid(f"{name}: binary data holds {i} elements, the shape says {n}")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise invalid(f"{name}[{i}]: element of {size} bytes runs past the binary data")
        try:
            texts.append(str(view[offset : offset + size], "utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(
                f"{name}[{i}] is not valid UTF-8 (byte {exc.start}); send UTF-8 text"
            ) from None
        offset += size
    if offset != len(view):
        raise invalid(f"{name}: binary data has {len(view) - offset} bytes past its {n} elements")
    return texts


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > size:
        raise invalid(
            f"{HEADER_LENGTH}: {value!r} is not a length within the {size}-byte body; "
            "give the JSON header's length in bytes"
        )
    return int(value)


def _rows(shape: Any, name: str, max_inputs: int) -> int:
    """Rows of a text tensor: shape ``[n]`` or ``[n, 1]``."""
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise invalid(f"{name}: shape {shape!r}, expected [n] or [n, 1]")
    n = shape[0]
    if n < 1:
        raise invalid(f"{name}: shape {shape!r}; give at least one text")
    if n > max_inputs:
        raise too_many(name, n, max_inputs)
    return n


def _json_texts(data: Any, n: int, name: str) -> list[str]:
    """The texts of a JSON ``data`` array, flat or nested by rows (``[[a], [b]]``)."""
    if not isinstance(data, list):
        raise invalid(f"{name}.data: expected an array of strings")
    if len(data) != n:
        raise invalid(f"{name}.data: {len(data)} elements, the shape says {n}")
    texts = []
    for i, value in enumerate(data):
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # row-major nesting of an [n, 1] tensor
        if not isinstance(value, str):
            raise invalid(f"{name}[{i}]: expected a string")
        texts.append(value)
    return texts


def parse_v2_infer(
    body: bytes,
    header_length: str | None,
    *,
    max_inputs: int,
    max_text_chars: int,
    outputs: Sequence[str],
) -> V2Request:
    """An inference request, JSON or with binary tensors after its JSON header.

    ``header_length``: the ``Inference-Header-Content-Length`` header, when sent.
    ``outputs``: the output names this model has (requested ones are checked)."""
    size = _header_length(header_length, len(body))
    raw_header = body if size is None else body[:size]
    over = v2_rows_over(raw_header, max_inputs)
    if over is not None:
        raise too_many(over, f"more than {max_inputs}", max_inputs)
    header = load_json(raw_header)
    binary = memoryview(body)[size:] if size is not None else memoryview(b"")
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise invalid('body: expected an object {"inputs": [...]} (Open Inference Protocol)')
    tensors: dict[str, dict] = {}
    for i, tensor in enumerate(header["inputs"]):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name not in (TEXT, TEXT_PAIR):
            raise invalid(
                f"inputs[{i}]: input {name!r} is unknown; this model takes {TEXT!r} and "
                f"optionally {TEXT_PAIR!r}"
            )
        if name in tensors:
            raise invalid(f"inputs[{i}]: input {name!r} is given twice")
        tensors[name] = tensor
    if TEXT not in tensors:
        raise invalid(f"inputs: give the BYTES input {TEXT!r}")
    # Shapes first: a large request is refused before its data is read.
    rows = {name: _rows(t.get("shape"), name, max_inputs) for name, t in tensors.items()}
    if TEXT_PAIR in rows and rows[TEXT_PAIR] != rows[TEXT]:
        raise invalid(f"{TEXT_PAIR}: {rows[TEXT_PAIR]} rows, {TEXT!r} has {rows[TEXT]}")
    offset = 0
    texts: dict[str, list[str]] = {}
    for tensor in header["inputs"]:  # binary parts follow in the order of the inputs
        name, n = tensor["name"], rows[tensor["name"]]
        if tensor.get("datatype") != "BYTES":
            raise invalid(f"{name}: datatype {tensor.get('datatype')!r}, expected 'BYTES'")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid(f"{name}.parameters: expected an object")
        if "shared_memory_region" in params:
            raise invalid(f"{name}: shared memory is not supported; send the data")
        nbytes = params.get("binary_data_size")
        if nbytes is None:
            if "data" not in tensor:
                raise invalid(f"{name}: give 'data' or parameters.binary_data_size")
            texts[name] = _json_texts(tensor.get("data"), n, name)
            continue
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise invalid(f"{name}.parameters.binary_data_size: expected a byte count")
        if offset + nbytes > len(binary):
            raise invalid(
                f"{name}: binary_data_size {nbytes} runs past the {len(binary)} bytes after "
                f"the JSON header ({HEADER_LENGTH})"
            )
        texts[name] = decode_bytes_tensor(binary[offset : offset + nbytes], n, name)
        offset += nbytes
    for name, values in texts.items():
        for i, value in enumerate(values):
            check_text(value, f"{name}[{i}]", max_text_chars)
    params = header.get("parameters") or {}
    binary_default = bool(isinstance(params, dict) and params.get("binary_data_output"))
    requested, wants_binary = _requested(header.get("outputs"), outputs, binary_default)
    request_id = header.get("id")
    return V2Request(
        texts=texts[TEXT],
        pairs=texts.get(TEXT_PAIR),
        outputs=requested,
        binary=wants_binary,
        binary_default=binary_default,
        id=request_id if isinstance(request_id, str) else None,
    )


def _requested(
    spec: Any, known: Sequence[str], binary_default: bool
) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    if spec is None:
        return None, frozenset(known) if binary_default else frozenset()
    if not isinstance(spec, list):
        raise invalid("outputs: expected an array of {name, parameters}")
    names: list[str] = []
    binary = set()
    for i, out in enumerate(spec):
        name = out.get("name") if isinstance(out, dict) else None
        if name not in known:
            raise invalid(f"outputs[{i}]: output {name!r} is unknown; this model has {list(known)}")
        params = out.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid(f"outputs[{i}].parameters: expected an object")
        if params.get("classification"):
            raise invalid(f"outputs[{i}]: the classification extension is not supported")
        if params.get("binary_data", binary_default):
            binary.add(name)
        if name not in names:
            names.append(name)
    return tuple(names), frozenset(binary)


def v2_fields(fields: Sequence[OutputFieldLike]) -> list[OutputFieldLike]:
    """The ensemble-level fields a V2 answer carries (those with a V2 datatype)."""
    return [f for f in fields if f.v2_datatype and not f.member]


def v2_tensors(
    columns: dict[str, np.ndarray],
    fields: Sequence[OutputFieldLike],
    requested: Sequence[str] | None = None,
) -> list[V2Tensor]:
    """The output tensors of scored rows: each field with a V2 datatype, as requested."""
    by_name = {f.name: f for f in v2_fields(fields)}
    names = list(by_name) if requested is None else list(requested)
    tensors = []
    for name in names:
        datatype = by_name[name].v2_datatype
        values = np.asarray(columns[name])
        if datatype == "BYTES":
            # Per-row lists and objects (a tagger's words, tags, entities) travel as JSON.
            data = np.asarray([_bytes_value(v) for v in values.reshape(-1)], object)
            data = data.reshape(values.shape)
        else:
            data = values.astype(V2_NUMPY[datatype])  # type: ignore[index]
        tensors.append(V2Tensor(name, datatype, data))  # type: ignore[arg-type]
    return tensors


def _bytes_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, allow_nan=False)
    return str(value)


def _raw(tensor: V2Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return encode_bytes_tensor(tensor.data.reshape(-1).tolist())
    return np.ascontiguousarray(tensor.data, dtype=V2_NUMPY[tensor.datatype]).tobytes()


def encode_v2_response(
    *,
    model_name: str,
    tensors: Sequence[V2Tensor],
    binary: frozenset[str] | set[str] = frozenset(),
    request_id: str | None = None,
    model_version: str = "1",
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some output is binary
    (send it as ``Inference-Header-Content-Length``; ``None``: the body is all JSON)."""
    outputs = []
    raws = []
    for tensor in tensors:
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if tensor.name in binary:
            raw = _raw(tensor)
            out["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            out["data"] = tensor.data.reshape(-1).tolist()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not raws:
        return header, None
    return header + b"".join(raws), len(header)


def v2_model_metadata(
    name: str,
    fields: Sequence[OutputFieldLike],
    widths: dict[str, tuple[int, ...]],
    parameters: dict[str, Any] | None = None,
    *,
    platform: str = "ray-ensemble",
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs, outputs and their shapes (-1: any size).

    ``widths``: each output's trailing dimensions, e.g. ``{"probs": (2,), "label": ()}``;
    an output not in it has one of unknown size (a vector, until the first answer)."""
    outputs = []
    for f in v2_fields(fields):
        shape = [-1, *widths.get(f.name, (-1,))]
        outputs.append({"name": f.name, "datatype": f.v2_datatype, "shape": shape})
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": [
            {"name": TEXT, "datatype": "BYTES", "shape": [-1]},
            {"name": TEXT_PAIR, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": outputs,
        # Metadata tensors have no "optional" in the protocol: say it here.
        "parameters": {"optional_inputs": [TEXT_PAIR], **(parameters or {})},
    }


# --- OpenAI embeddings -------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[str]
    encoding_format: str = "float"
    dimensions: int | None = None


def parse_embeddings(body: bytes, *, max_inputs: int, max_text_chars: int) -> EmbeddingsRequest:
    """``{"model", "input": str | [str], "encoding_format"?, "dimensions"?, "user"?}``."""
    if items_over(body, "input", max_inputs):
        raise too_many("input", f"more than {max_inputs}", max_inputs)
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise invalid('body: expected an object {"model": ..., "input": ...}')
    unknown = sorted(set(doc) - {"model", "input", "encoding_format", "dimensions", "user"})
    if unknown:
        raise invalid(f"{unknown[0]}: not a field of an embeddings request")
    texts = doc.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise invalid("input: give a string or an array of strings")
    if not texts:
        raise invalid("input: give at least one text")
    if len(texts) > max_inputs:
        raise too_many("input", len(texts), max_inputs)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid(f"input[{i}]: expected a string (token ids are not taken; send text)")
        check_text(text, f"input[{i}]", max_text_chars)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: give the ensemble's name")
    fmt = doc.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise invalid(f"encoding_format: {fmt!r}, expected 'float' or 'base64'")
    dims = doc.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise invalid("dimensions: expected a positive integer")
    return EmbeddingsRequest(model=model, texts=texts, encoding_format=fmt, dimensions=dims)


def embeddings_response(
    model: str, vectors: np.ndarray, *, encoding_format: str = "float", tokens: int = 0
) -> dict[str, Any]:
    """The OpenAI answer: one ``{"object": "embedding", "index", "embedding"}`` per text.

    ``base64`` is the float32 little-endian bytes, as the OpenAI client decodes them."""
    values = np.ascontiguousarray(vectors, dtype="<f4")
    data = []
    for i, row in enumerate(values):
        vector: Any = (
            base64.b64encode(row.tobytes()).decode("ascii")
            if encoding_format == "base64"
            else row.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
