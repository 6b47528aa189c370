"""The body of a ``forget`` log record: a rebuilt expert and its strategy state, exactly.

One safetensors file: the adapter's float32 tensors under their PEFT names, and the
strategy state's tensors under its own prefixes (``buffer.``, ``m.``, ``v.``, which no
PEFT name starts with) with its scalars in the metadata. Replaying the record decodes
it: no arithmetic, so recovery gives the rebuilt state bit for bit.
"""

from __future__ import annotations

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmoe.adapters import AdapterSchema, read_header
from fedmoe.aggregate import AdapterState
from fedmoe.server_strategy import StrategyState

STATE_KEY = "fedmoe_strategy_state"


def encode_rebuilt(params: AdapterState, state: StrategyState) -> bytes:
    """The record body of ``params`` with ``state`` (float32, as held in memory)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in params.items()}
    extra = state.tensors()
    clash = sorted(set(tensors) & set(extra))
    if clash:
        raise ValueError(f"adapter tensor names clash with strategy state names: {clash[:3]}")
    metadata = {} if state.empty else state.scalars()
    return save_safetensors(tensors | extra, metadata=metadata)


def decode_rebuilt(body: bytes, schema: AdapterSchema) -> tuple[AdapterState, StrategyState]:
    """The inverse of ``encode_rebuilt``; the adapter's keys and shapes are checked."""
    tensors = load_safetensors(body)
    missing = sorted(set(schema) - set(tensors))
    if missing:
        raise ValueError(f"a rebuilt expert lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    params = {key: tensors.pop(key) for key in schema}
    for key, tensor in params.items():
        if tuple(tensor.shape) != tuple(schema[key]):
            raise ValueError(f"rebuilt tensor {key} has shape {tuple(tensor.shape)}")
    metadata = read_header(body).get("__metadata__") or {}
    if STATE_KEY not in metadata:
        return params, StrategyState()
    return params, StrategyState.from_parts(tensors, metadata)
