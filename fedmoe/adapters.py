"""Adapter tensors on the wire and on disk: safetensors bytes, schema checks, PEFT dirs.

Every LoRA tensor travels under its PEFT state-dict key. Untrusted bytes are
checked header-first (keys, dtypes, shapes, offsets) before any tensor is
materialised, and nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings
from fedmoe.parallel import per_tensor

ACCEPTED_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
MAX_HEADER_BYTES = 16 * 1024 * 1024
ADAPTER_FILE = "adapter_model.safetensors"


class AdapterValidationError(ValueError):
    """The bytes are not a valid adapter for this schema; the message says why."""


AdapterSchema = dict[str, tuple[int, ...]]
# what tensors are read from (never written): an upload's body is a read-only view of the
# buffer it was received into (``fedmoe.adapter_stream``), not a copy
Buffer = bytes | bytearray | memoryview | mmap.mmap


def schema_of(state: Mapping[str, torch.Tensor]) -> AdapterSchema:
    """Tensor names and shapes of an adapter state."""
    return {key: tuple(tensor.shape) for key, tensor in sorted(state.items())}


def float32_bytes(schema: AdapterSchema) -> int:
    """Size of the tensors of ``schema`` in float32."""
    return sum(4 * _numel(shape) for shape in schema.values())


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def encode_adapter(
    state: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> bytes:
    """Serialise an adapter state to safetensors bytes (optionally cast to ``dtype``)."""
    tensors = {
        key: (t.detach().to("cpu", dtype) if dtype else t.detach().cpu()).contiguous()
        for key, t in sorted(state.items())
    }
    return save_safetensors(tensors, metadata=metadata)


def read_header(body: Buffer) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header of ``body`` without loading tensors."""
    if len(body) < 8:
        raise AdapterValidationError(f"body is {len(body)} bytes: too short for safetensors")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(body):
        raise AdapterValidationError(
            f"safetensors header length {header_len} does not fit a body of {len(body)} bytes"
        )
    try:
        header = json.loads(bytes(body[8 : 8 + header_len]))
    except (ValueError, RecursionError) as error:  # also too deeply nested or too long ints
        raise AdapterValidationError(f"safetensors header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise AdapterValidationError("safetensors header is not a JSON object")
    return header


def check_header(header: dict[str, Any], schema: AdapterSchema, data_len: int) -> None:
    """Keys, dtypes, shapes and byte ranges of a header must match ``schema`` exactly."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    missing, extra = sorted(set(schema) - set(tensors)), sorted(set(tensors) - set(schema))
    if missing or extra:
        raise AdapterValidationError(
            f"adapter keys differ from the schema: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {extra[:3]} ({len(extra)} in all)"
        )
    for key, info in tensors.items():
        _check_entry(key, info, schema[key], data_len)


def _check_entry(key: str, info: Any, shape: tuple[int, ...], data_len: int) -> None:
    if not isinstance(info, dict):
        raise AdapterValidationError(f"{key}: header entry is not an object")
    dtype, got_shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ACCEPTED_DTYPES:
        raise AdapterValidationError(
            f"{key}: dtype {dtype!r} is not accepted; use one of {sorted(ACCEPTED_DTYPES)}"
        )
    if not isinstance(got_shape, list) or tuple(got_shape) != shape:
        raise AdapterValidationError(f"{key}: shape {got_shape} does not match {list(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
        or offsets[1] - offsets[0] != _numel(shape) * ACCEPTED_DTYPES[dtype]
    ):
        raise AdapterValidationError(f"{key}: data_offsets {offsets} are invalid")


def decode_adapter(body: Buffer, schema: AdapterSchema) -> AdapterState:
    """Validate untrusted safetensors bytes against ``schema`` and return float32 tensors
    (``decode_with_norm`` without the norm)."""
    return decode_with_norm(body, schema)[0]


# bytes are immutable to Python: the views are only read, by the float32 conversion. torch
# warns once per process about such views; that once is spent here, where no other thread
# can be changing the warning filters.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.frombuffer(bytes(4), dtype=torch.float32)

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check_layout(
    body: Buffer, schema: AdapterSchema, size: int | None = None
) -> tuple[dict[str, Any], int, list[str]]:
    """Check untrusted safetensors bytes against ``schema`` without reading tensor data:
    header, keys, shapes, dtypes, metadata and byte ranges (``AdapterValidationError``).
    ``body`` may be only the beginning (with the whole header) of a body of ``size`` bytes.
    Returns the header, where the data starts and the tensor names in data order."""
    size = len(body) if size is None else size
    header = read_header(body)
    (header_len,) = struct.unpack("<Q", body[:8])
    start = 8 + header_len
    if start > size:
        raise AdapterValidationError(f"safetensors header does not fit a body of {size} bytes")
    check_header(header, schema, size - start)
    _check_metadata(header.get("__metadata__"))
    return header, start, _tiled_keys(header, size - start)


def tensor_with_norm(
    body: Buffer, start: int, info: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One checked tensor of ``body`` as a new float32 tensor, and its L2 norm accumulated in
    float64 (``info``: its header entry; ``start``: where the data starts)."""
    begin, stop = info["data_offsets"]
    tensor = _float32(body, start + begin, stop - begin, DTYPES[info["dtype"]], info["shape"])
    return tensor, torch.linalg.vector_norm(tensor, dtype=torch.float64)


def combined_norm(state: AdapterState, norms: Sequence[torch.Tensor]) -> float:
    """The global L2 norm from the per-tensor ones (``aggregate.global_norm``'s combination,
    in the order given); a non-finite one is refused, naming the first bad tensor."""
    norm = float(torch.linalg.vector_norm(torch.stack(list(norms)))) if norms else 0.0
    if not math.isfinite(norm):
        for key in sorted(state):
            if not bool(torch.isfinite(state[key]).all()):
                raise AdapterValidationError(f"{key}: contains NaN or Inf values")
    return norm


def decode_with_norm(body: Buffer, schema: AdapterSchema) -> tuple[AdapterState, float]:
    """Validate untrusted safetensors bytes against ``schema``: float32 tensors and their
    global L2 norm, in as few passes over the data as the checks allow.

    ``AdapterValidationError`` names the first problem: a malformed or truncated body,
    wrong keys, shapes or dtypes, byte ranges that do not tile the data exactly (as the
    safetensors reader requires), or non-finite values. The tensors are read in place
    from the body (``torch.frombuffer``: the float32 conversion is the one copy); the
    finiteness check *is* the L2 norm (per tensor, accumulated in float64, as
    ``aggregate.global_norm``): squares of float32 values cannot overflow float64, so the
    norm is finite exactly when every value is, and only a non-finite norm pays for a scan
    to name the first bad tensor. (A float32 ``dot`` would be cheaper by about a third of
    the decode, but its relative error, about 1e-6, would reach the clip weights.)
    Conversion and norms run on two threads (``fedmoe.parallel``).
    """
    header, start, keys = check_layout(body, schema)

    def convert(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tensor_with_norm(body, start, header[key])

    done = per_tensor(convert, keys, [_numel(header[key]["shape"]) for key in keys])
    state = {key: tensor for key, (tensor, _) in done.items()}
    return state, combined_norm(state, [n for _, n in done.values()])


def _tiled_keys(header: dict[str, Any], data_len: int) -> list[str]:
    """The tensor names in data order; their byte ranges must tile the data exactly."""
    keys = sorted(
        (key for key in header if key != "__metadata__"),
        key=lambda key: tuple(header[key]["data_offsets"]),
    )
    end = 0
    for key in keys:
        begin, stop = header[key]["data_offsets"]
        if begin != end:
            raise AdapterValidationError(
                f"{key}: data_offsets {[begin, stop]} leave a gap or overlap"
            )
        end = stop
    if end != data_len:
        raise AdapterValidationError(f"{data_len - end} bytes follow the last tensor")
    return keys


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterValidationError("safetensors __metadata__ must map strings to strings")


def _float32(
    body: Buffer, offset: int, length: int, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor:
    """One tensor of ``body`` as a new float32 tensor (read in place when aligned)."""
    size = torch.empty((), dtype=dtype).element_size()
    if length == 0:
        return torch.zeros(shape, dtype=torch.float32)
    if offset % size:  # a misaligned range (legal in the format): copied first
        body, offset = bytes(body[offset : offset + length]), 0
    view = torch.frombuffer(body, dtype=dtype, count=length // size, offset=offset)
    converted = view.float() if dtype != torch.float32 else view.clone()
    return converted.view(shape)


def view_adapter(payload: bytes) -> AdapterState:
    """Float32 tensors that share memory with ``payload``, our own float32 safetensors bytes.

    The coordinator keeps each expert once: the views serve the update rule and the
    same bytes serve downloads. The tensors must never be modified in place.
    """
    header = read_header(payload)
    (header_len,) = struct.unpack("<Q", payload[:8])
    data_start = 8 + header_len
    state: AdapterState = {}
    with warnings.catch_warnings():
        # bytes are immutable to Python; these tensors are read-only by contract
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info.get("dtype") != "F32":
                raise AdapterValidationError(f"{key}: expected F32, got {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            flat = torch.frombuffer(
                payload, dtype=torch.float32, count=(end - begin) // 4, offset=data_start + begin
            )
            state[key] = flat.view(info["shape"])
    return state


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def prune_versions(directory: Path, name: str, tag: str, keep: Path) -> None:
    """Remove every ``{name}.{tag}NNNNNNNNNN.safetensors`` file in ``directory`` but ``keep``,
    and the temp files ``atomic_write`` left of them."""
    # exact patterns: a glob on "name.v*" would also match an expert called "name.v2"
    ours = re.compile(rf"\.?{re.escape(name)}\.{tag}\d{{10}}\.safetensors(\.[A-Za-z0-9_]+\.tmp)?")
    for path in directory.iterdir():
        if path != keep and ours.fullmatch(path.name):
            path.unlink(missing_ok=True)


def write_peft_dir(
    state: Mapping[str, torch.Tensor],
    lora: LoraSettings,
    directory: Path,
    *,
    base_model: str,
    rank: int | None = None,
    alpha: float | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a standard PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = lora.to_peft(rank=rank, alpha=alpha)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(directory))
    payload = encode_adapter(state, metadata={"format": "pt", **(metadata or {})})
    atomic_write(directory / ADAPTER_FILE, payload)
    return directory
