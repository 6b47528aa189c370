"""The coordinator's intake of an upload: validate and decode once, with its norm.

``decode_update`` does what ``fedmoe.adapters.decode_adapter`` does for untrusted bytes
(header first: keys, dtypes, shapes, offsets; then NaN/Inf) with fewer passes over the
data, for the acknowledgement's sake (issue 13):

* the tensors are read in place from the body (``torch.frombuffer``: no copy before the
  float32 conversion, which is the one copy the update rule needs);
* the finiteness check *is* the update's L2 norm (as ``aggregate.global_norm``: per
  tensor, accumulated in float64): squares of float32 values cannot overflow float64, so
  the norm is finite exactly when every value is, and the update path needs it anyway. Only a
  non-finite norm pays for a per-tensor scan, to name the first bad tensor;
* conversion and norms run on two threads, half the tensors each (``fedmoe.parallel``).

The byte ranges must tile the data exactly (no gap, no overlap, nothing after), as the
safetensors reader itself requires.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

import torch

from fedmoe.adapters import AdapterSchema, AdapterValidationError, check_header, read_header
from fedmoe.aggregate import AdapterState
from fedmoe.parallel import per_tensor

# bytes are immutable to Python: the views are only read, by the float32 conversion. torch
# warns once per process about such views; that once is spent here, where no other thread
# can be changing the warning filters.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.frombuffer(bytes(4), dtype=torch.float32)

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def decode_update(body: bytes, schema: AdapterSchema) -> tuple[AdapterState, float]:
    """Validate untrusted safetensors bytes against ``schema``: float32 tensors and their
    global L2 norm. ``AdapterValidationError`` names the first problem."""
    header = read_header(body)
    (header_len,) = struct.unpack("<Q", body[:8])
    start = 8 + header_len
    check_header(header, schema, len(body) - start)
    _check_metadata(header.get("__metadata__"))
    keys = _tiled_keys(header, len(body) - start)

    def convert(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        info = header[key]
        begin, stop = info["data_offsets"]
        tensor = _float32(body, start + begin, stop - begin, DTYPES[info["dtype"]], info["shape"])
        return tensor, torch.linalg.vector_norm(tensor, dtype=torch.float64)

    done = per_tensor(convert, keys, [_numel(header[key]["shape"]) for key in keys])
    state = {key: tensor for key, (tensor, _) in done.items()}
    # aggregate.global_norm's combination of the per-tensor norms, in the same order
    norm = float(torch.linalg.vector_norm(torch.stack([n for _, n in done.values()])))
    if not math.isfinite(norm):
        for key in sorted(state):
            if not bool(torch.isfinite(state[key]).all()):
                raise AdapterValidationError(f"{key}: contains NaN or Inf values")
    return state, norm


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


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
    body: bytes, offset: int, length: int, dtype: torch.dtype, shape: list[int]
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
