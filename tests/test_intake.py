"""The one-pass decode of untrusted adapter bytes (issue 13: acknowledgement latency).

``decode_with_norm`` (which ``decode_adapter`` is, without the norm) must give the
safetensors library's values as float32 and the norm ``global_norm`` gives, and refuse a
bad body naming its problem; ``apply_update`` (one allocation, two
threads for big states) must be θ + w·Δ bit for bit; the body's digest, computed while it
arrives, must be the body's, in the ledger and in the fsynced log record that recovery
checks it against, and a bad body must leave everything as it was (real HTTP).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from blake3 import blake3
from safetensors.torch import load as load_safetensors

import fedmoe.api.body
from fedmoe.adapters import (
    AdapterValidationError,
    decode_adapter,
    decode_with_norm,
    encode_adapter,
    schema_of,
)
from fedmoe.aggregate import apply_update, global_norm
from fedmoe.api.body import BATCH, StreamingDigest
from fedmoe.coordinator.wal import ExpertLog
from fedmoe.parallel import MIN_ELEMENTS
from tests import api_helpers as api


def delta(seed: int, big: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA-like delta; ``big`` crosses the two-thread threshold."""
    generator = torch.Generator().manual_seed(seed)
    width = 2048 if big else 64
    return {
        f"layers.{i}.{part}.weight": torch.randn(shape, generator=generator) * 1e-3
        for i in range(40 if big else 3)
        for part, shape in (("lora_A", (16, width)), ("lora_B", (width, 16)))
    }


def raw_body(header: dict[str, object], data: bytes, pad: int = 0) -> bytes:
    """Safetensors bytes with a hand-made header (``pad`` spaces shift the data's offset)."""
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("big", [False, True])
def test_decode_with_norm_gives_the_librarys_values_and_the_global_norm(
    dtype: torch.dtype, big: bool
) -> None:
    state = delta(1, big)
    assert (sum(t.numel() for t in state.values()) >= MIN_ELEMENTS) == big
    body = encode_adapter(state, dtype=dtype)
    expected = {key: t.float() for key, t in load_safetensors(body).items()}
    decoded, norm = decode_with_norm(body, schema_of(state))
    assert all(torch.equal(decode_adapter(body, schema_of(state))[k], decoded[k]) for k in decoded)
    assert decoded.keys() == expected.keys()
    assert all(torch.equal(decoded[k], expected[k]) for k in expected)
    assert all(t.dtype == torch.float32 for t in decoded.values())
    assert norm == pytest.approx(global_norm(expected), rel=1e-12)


def test_a_misaligned_body_decodes_the_same() -> None:
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    for pad in range(4):  # data starting at every offset modulo 4
        decoded, norm = decode_with_norm(
            raw_body(header, values.numpy().tobytes(), pad), {"a": (2, 3)}
        )
        assert torch.equal(decoded["a"], values)
        assert norm == pytest.approx(math.sqrt(sum(i * i for i in range(6))))


def test_refusals_name_the_problem() -> None:
    state = delta(2)
    schema = schema_of(state)
    bad = dict(state)
    key = sorted(bad)[1]
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("inf")
    body = encode_adapter(bad, dtype=torch.bfloat16)
    with pytest.raises(AdapterValidationError, match=f"{key}: contains NaN or Inf") as caught:
        decode_with_norm(body, schema)
    with pytest.raises(AdapterValidationError) as old:
        decode_adapter(body, schema)
    assert str(caught.value) == str(old.value)
    with pytest.raises(AdapterValidationError, match="shape"):
        decode_with_norm(encode_adapter({**state, key: torch.zeros(1)}), schema)
    one = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(AdapterValidationError, match="follow the last tensor"):
        decode_with_norm(raw_body(one, bytes(12)), {"a": (2,)})
    two = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(AdapterValidationError, match="gap or overlap"):
        decode_with_norm(raw_body(two, bytes(12)), {"a": (2,), "b": (2,)})
    meta = {**one, "__metadata__": {"n": 1}}
    with pytest.raises(AdapterValidationError, match="__metadata__"):
        decode_with_norm(raw_body(meta, bytes(8)), {"a": (2,)})


@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, 0.70710678])
def test_apply_update_is_theta_plus_w_delta_bit_for_bit(scale: float) -> None:
    theta, update = delta(3, big=True), delta(4, big=True)
    generator = torch.Generator().manual_seed(5)
    update = {  # magnitudes far apart, so that any other rounding order shows
        key: tensor * 10 ** torch.randint(-8, 8, tensor.shape, generator=generator).float()
        for key, tensor in update.items()
    }
    kept = {key: tensor.clone() for key, tensor in update.items()}
    new = apply_update(theta, update, scale)
    assert list(new) == list(theta)
    for key in theta:
        assert torch.equal(new[key], theta[key] + scale * update[key]), key
        assert torch.equal(update[key], kept[key]), "Δ was modified"


def test_the_streamed_digest_is_the_bodys_blake3() -> None:
    body = torch.randint(0, 256, (5 * BATCH + 12345,), dtype=torch.uint8).numpy().tobytes()

    streamed = StreamingDigest()
    for start in range(0, len(body), 65536 + 7):  # chunks of an odd size
        streamed.feed(body[start : start + 65536 + 7])
    assert streamed.finish().result(timeout=60) == blake3(body).hexdigest()
    small = StreamingDigest()
    small.feed(b"abc")
    # b3sum's published test vector for "abc"
    expected = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert small.finish().result(timeout=60) == expected


def test_an_upload_over_http_is_logged_with_its_streamed_digest_and_refused_when_bad(
    live_coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedmoe.api.body, "BATCH", 512)  # the tiny body goes through the thread
    with live_coordinator.client() as http:
        api.register(http, api.PY_WORKER, api.PY)
        initial = api.expert_state(http, api.PY)
        state = api.random_delta(api.shapes_of(http), 1)
        body = encode_adapter(state, dtype=torch.bfloat16)
        assert len(body) > 8 * 512
        headers = api.update_headers(update_id="streamed")
        first = api.upload(http, api.PY, body, headers)
        assert first.status_code == 200, first.text
        digest = blake3(body).hexdigest()
        row = live_coordinator.coordinator.ledger.accepted_update("streamed")
        assert row is not None and (row.body_blake3, row.body_sha256) == (digest, None)
        ledger = http.get("/v1/ledger").json()
        listed = [r for r in ledger if r["update_id"] == "streamed"]
        assert [(r["body_blake3"], r["body_sha256"]) for r in listed] == [(digest, None)]
        # the fsynced record is whole: its body and the digest recovery checks it against
        log = ExpertLog(live_coordinator.state_dir / "wal" / api.PY, keep=True)
        (record,) = [r for r in log.records(repair=False) if r.header["kind"] == "update"]
        assert (record.body, record.header["body_blake3"]) == (body, digest)
        expected = apply_update(
            initial, decode_adapter(body, schema_of(initial)), first.json()["weight"]
        )
        after = api.expert_state(http, api.PY)
        assert all(torch.equal(after[key], expected[key]) for key in expected)
        again = api.upload(http, api.PY, body, headers)
        assert again.json() == first.json() | {"replayed": True}
        other = encode_adapter(api.random_delta(api.shapes_of(http), 2), dtype=torch.bfloat16)
        api.assert_error(
            api.upload(http, api.PY, other, headers), 409, "duplicate_update_id", "different body"
        )
        key = sorted(state)[2]
        state[key].view(-1)[3] = float("nan")
        before = api.snapshot(live_coordinator, http)
        bad = api.upload(
            http,
            api.PY,
            encode_adapter(state, dtype=torch.bfloat16),
            api.update_headers(base_version=1),
        )
        api.assert_error(bad, 422, "invalid_update", key, "NaN or Inf")
        api.assert_unchanged(before, api.snapshot(live_coordinator, http))
