"""Receiving an upload and decoding it on two threads (``fedmoe.adapter_stream``, issue 13).

Fed in chunks of any size, ``UploadBuffer`` must give exactly what
``decode_with_norm`` gives for the same bytes (every tensor bit for bit, the same norm),
and nothing (None) for a body it cannot vouch for, so that the update path decodes it
itself and refuses it with its usual message. Over HTTP a sized upload and a chunked one
(no Content-Length: not decoded on the way) must be applied alike. A receive buffer is
used again for the next body of its size only once nothing refers to it any more.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import torch

from fedmoe.adapter_stream import ReceivePool, UploadBuffer
from fedmoe.adapters import AdapterValidationError, decode_with_norm, encode_adapter, schema_of
from tests import api_helpers as api


def delta(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.{part}.weight": torch.randn(shape, generator=generator) * 1e-3
        for i in range(6)
        for part, shape in (("lora_A", (8, 300)), ("lora_B", (300, 8)))
    }


def streamed(body: bytes, schema: dict[str, tuple[int, ...]], chunk: int) -> object:
    decoder = UploadBuffer(schema, len(body))
    for start in range(0, len(body), chunk):
        decoder.feed(body[start : start + chunk])
    assert decoder.body() == body
    return decoder.finish().result(timeout=60)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [1 << 16, 4099, 7])
def test_buffered_decode_is_decode_with_norm_bit_for_bit(
    dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedmoe.adapter_stream.BATCH", 4096)  # many batches for small tensors
    state = delta(1)
    body = encode_adapter(state, dtype=dtype)
    expected, norm = decode_with_norm(body, schema_of(state))
    result = streamed(body, schema_of(state), chunk)
    assert isinstance(result, tuple)
    got, got_norm = result
    assert list(got) == list(expected) and got_norm == norm  # same order, same float
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_batches_the_helper_has_not_started_are_converted_by_the_tail_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from fedmoe import adapter_stream

    monkeypatch.setattr("fedmoe.adapter_stream.BATCH", 4096)
    state = delta(3)
    body = encode_adapter(state, dtype=torch.bfloat16)
    expected, norm = decode_with_norm(body, schema_of(state))
    release = threading.Event()
    adapter_stream._POOL.submit(release.wait, 60)  # the helper is busy: nothing starts
    decoder = UploadBuffer(schema_of(state), len(body))
    for start in range(0, len(body), 5000):
        decoder.feed(body[start : start + 5000])
    finished = decoder.finish()
    try:
        result = finished.result(timeout=60)  # every batch converted by the tail thread
    finally:
        release.set()
    assert isinstance(result, tuple)
    assert all(pending.cancelled() for _, pending in decoder._batches)
    got, got_norm = result
    assert list(got) == list(expected) and got_norm == norm
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def bad_bodies() -> Iterator[tuple[str, bytes, dict[str, tuple[int, ...]]]]:
    state = delta(2)
    schema = schema_of(state)
    body = encode_adapter(state, dtype=torch.bfloat16)
    yield "wrong shape", body, {**schema, sorted(schema)[0]: (9, 9)}
    poisoned = {key: tensor.clone() for key, tensor in state.items()}
    poisoned[sorted(poisoned)[3]].view(-1)[5] = float("nan")
    yield "NaN", encode_adapter(poisoned, dtype=torch.bfloat16), schema
    yield "header too long", struct.pack("<Q", 1 << 40) + body[8:], schema
    yield "header not JSON", body[:8] + b"{" * 40 + body[48:], schema


@pytest.mark.parametrize("case", list(bad_bodies()), ids=lambda case: case[0])
def test_a_body_it_cannot_vouch_for_is_left_to_the_update_paths_decode(
    case: tuple[str, bytes, dict[str, tuple[int, ...]]],
) -> None:
    _, body, schema = case
    assert streamed(body, schema, 1000) is None
    with pytest.raises(AdapterValidationError):
        decode_with_norm(body, schema)


def test_sized_and_chunked_uploads_are_applied_alike(live_coordinator) -> None:
    with live_coordinator.client() as http:
        api.register(http, api.PY_WORKER, api.PY)
        state = api.random_delta(api.shapes_of(http), 5)
        body = encode_adapter(state, dtype=torch.bfloat16)
        sized = api.upload(http, api.PY, body, api.update_headers(update_id="sized"))
        assert sized.status_code == 200, sized.text

        def pieces() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
            yield from (body[i : i + 5000] for i in range(0, len(body), 5000))

        headers = api.update_headers(update_id="chunked", base_version=1)
        chunked = http.post(f"/v1/experts/{api.PY}/updates", content=pieces(), headers=headers)
        assert chunked.status_code == 200, chunked.text
    norm = decode_with_norm(body, {k: tuple(v.shape) for k, v in state.items()})[1]
    assert sized.json()["update_norm"] == chunked.json()["update_norm"] == norm


def test_a_receive_buffer_is_taken_again_only_once_nothing_refers_to_it() -> None:
    pool = ReceivePool(keep=2)
    first = pool.take(64)
    assert pool.take(64) is not first  # in use: a new one
    view = memoryview(first)
    first_id = id(first)
    del first
    assert id(pool.take(64)) != first_id  # a view still reads it
    view.release()
    del view
    again = pool.take(64)
    assert id(again) == first_id  # nothing refers to it: taken again
    assert pool.take(32) is not again and len(pool.take(32)) == 32  # sizes are not mixed


def test_a_reused_buffer_never_changes_what_an_earlier_upload_decoded() -> None:
    # float32 bodies decode to tensors that may read the receive buffer itself (no copy):
    # the next upload of the same size must not be received into it while they live
    schema = schema_of(delta(0))
    bodies = [encode_adapter(delta(seed), dtype=torch.float32) for seed in (1, 2, 3)]
    kept = []
    for body in bodies:
        decoder = UploadBuffer(schema, len(body))
        decoder.feed(body)
        decoded = decoder.finish().result(timeout=60)
        assert decoded is not None
        kept.append(decoded[0])
        del decoder, decoded
    for state, seed in zip(kept, (1, 2, 3), strict=True):
        expected = decode_with_norm(encode_adapter(delta(seed), dtype=torch.float32), schema)[0]
        assert all(torch.equal(state[key], expected[key]) for key in expected)
    buffers = set()
    for body in bodies[:2]:  # nothing kept now: the same buffer serves both
        decoder = UploadBuffer(schema, len(body))
        decoder.feed(body)
        buffers.add(id(decoder.buffer))
        del decoder
    kept.clear()
    assert len(buffers) == 1
