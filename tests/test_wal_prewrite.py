"""A big body written into the log ahead of its record (issue 13: acknowledgement latency).

``ExpertLog.prewrite`` writes and flushes the body while the update is decoded and applied;
``append`` then fills the reserved hole in front of it with the prefix and the padded
header and fsyncs. The record must read back exactly as one appended in one go; a crash
at each point before the header is whole (body half written, body whole without header,
header with half the body) must leave a torn tail that start-up cuts off, so the log is
byte for byte what it was; a refused update must leave the log as it was, live; and the
coordinator's own path must use it and replay to the same float32 state bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from fedmoe.adapter_stream import receive_buffer
from fedmoe.adapters import AdapterValidationError, decode_with_norm, encode_adapter
from fedmoe.coordinator.bootstrap import open_coordinator, register_in_process
from fedmoe.coordinator.errors import InvalidUpdateError
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.versions import UpdateRequest
from fedmoe.coordinator.wal import (
    ALIGN,
    PREFIX,
    PREWRITE_MIN,
    RESERVED,
    Appended,
    ExpertLog,
    _write_direct,
)
from fedmoe.state_digest import state_digest

SQL = "sql_expert"
POOL = ThreadPoolExecutor(max_workers=1)


def header(lsn: int, **extra: Any) -> dict[str, Any]:
    return {"lsn": lsn, "kind": "update", "body_blake3": None, **extra}


def body_of(seed: int, size: int = 3 * PREWRITE_MIN) -> bytes:
    return (
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )


def two_records(directory: Path) -> tuple[ExpertLog, bytes, Appended]:
    """A log holding one plain record and one written ahead; the segment's bytes and where
    the second record went."""
    log = ExpertLog(directory, keep=False)
    log.append(header(1), b"small")
    body = body_of(2)
    appended = log.append(header(2), body, log.prewrite(2, body, POOL))
    # the body starts aligned (for direct I/O), at least RESERVED bytes after its record
    assert appended.body_offset % ALIGN == 0 and appended.body_len == len(body)
    assert RESERVED <= appended.body_offset - appended.offset < RESERVED + ALIGN
    assert log.read_body(appended.segment, appended.body_offset, appended.body_len) == body
    return log, (directory / log.segments()[0]).read_bytes(), appended


def test_a_written_ahead_record_reads_back_as_one_appended_whole(tmp_path: Path) -> None:
    log, _, _ = two_records(tmp_path / "x")
    records = list(ExpertLog(tmp_path / "x", keep=False).records())
    assert [(r.lsn, r.body) for r in records] == [(1, b"small"), (2, body_of(2))]
    assert records[1].header == header(2)  # the padding is JSON whitespace
    # a header too big for the reservation: the record is written the usual way
    body = body_of(3)
    big = header(3, note="n" * (RESERVED + ALIGN))
    appended = log.append(big, body, log.prewrite(3, body, POOL))
    assert appended.body_offset - appended.offset > RESERVED
    assert [r.header for r in ExpertLog(tmp_path / "x", keep=False).records()][-1] == big


def crash_states(whole: bytes, appended: Appended, body: bytes) -> dict[str, bytes]:
    """What a crash can leave of the written-ahead record ``appended``."""
    start, reserved = appended.offset, appended.body_offset - appended.offset
    hole = bytes(reserved)  # a hole in the file reads as zeros
    record = whole[start:]
    return {
        "half the body, no header": whole[:start] + hole + body[: len(body) // 2],
        "the body, no header": whole[:start] + hole + body,
        "the header, half the body": whole[:start] + record[: reserved + len(body) // 2],
        "the prefix, not all the header": whole[:start] + record[: PREFIX.size + 7],
    }


@pytest.mark.parametrize(
    "state",
    [
        "half the body, no header",
        "the body, no header",
        "the header, half the body",
        "the prefix, not all the header",
    ],
)
def test_a_crash_at_each_point_of_a_written_ahead_record_leaves_a_cut_torn_tail(
    tmp_path: Path, state: str
) -> None:
    _, whole, appended = two_records(tmp_path / "x")
    start = appended.offset
    shutil.rmtree(tmp_path / "x")
    log = ExpertLog(tmp_path / "y", keep=False)
    log.append(header(1), b"small")
    segment = tmp_path / "y" / log.segments()[0]
    segment.write_bytes(crash_states(whole, appended, body_of(2))[state])
    reopened = ExpertLog(tmp_path / "y", keep=False)
    assert [r.lsn for r in reopened.records()] == [1]  # the unacknowledged record is gone
    assert segment.read_bytes() == whole[:start]
    body = body_of(4)  # and the log goes on from there
    reopened.append(header(2), body, reopened.prewrite(2, body, POOL))
    assert [r.body for r in ExpertLog(tmp_path / "y", keep=False).records()][-1] == body


def test_a_discarded_body_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    log, whole, _ = two_records(tmp_path / "x")
    log.discard(log.prewrite(3, body_of(5), POOL))
    assert (tmp_path / "x" / log.segments()[0]).read_bytes() == whole
    log.roll()  # a new segment, then refused: no new file
    log.discard(log.prewrite(3, body_of(6), POOL))
    assert len(log.segments()) == 1
    body = body_of(7)
    log.append(header(3), body, log.prewrite(3, body, POOL))
    assert [r.lsn for r in ExpertLog(tmp_path / "x", keep=False).records()] == [1, 2, 3]


def _direct_io_allowed(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


def test_whole_blocks_of_an_aligned_body_go_by_direct_io_the_rest_is_left(tmp_path: Path) -> None:
    path = tmp_path / "segment.log"
    if not _direct_io_allowed(path):
        pytest.skip("this file system refuses direct I/O")
    payload = body_of(8, size=3 * ALIGN + 100)
    received = receive_buffer(len(payload))  # page-aligned, as an upload is received
    received[:] = payload
    view = memoryview(received)
    rest, position = _write_direct(path, view, ALIGN)
    assert (len(rest), position) == (100, 4 * ALIGN)  # the tail is left to a buffered write
    assert path.read_bytes()[ALIGN:] == payload[: 3 * ALIGN]
    # unaligned memory, position or size: nothing written, all of it left
    assert _write_direct(path, view[1:], ALIGN)[0].nbytes == len(payload) - 1
    assert _write_direct(path, view, ALIGN + 512)[1] == ALIGN + 512
    assert _write_direct(path, view[:100], 0)[0].nbytes == 100
    assert path.stat().st_size == 4 * ALIGN


def _settings(state_dir: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        host="127.0.0.1", state_dir=state_dir, experts=[SQL], auth_token=None
    )


def test_the_update_path_writes_ahead_refuses_cleanly_and_replays_bit_for_bit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = open_coordinator(_settings(tmp_path))
    register_in_process(coordinator, "w", SQL)
    schema, segments = coordinator.schema, tmp_path / "wal" / SQL

    def body(seed: int, scale: float = 1e-2) -> bytes:
        generator = torch.Generator().manual_seed(seed)
        delta = {k: torch.randn(s, generator=generator) * scale for k, s in schema.items()}
        return encode_adapter(delta, dtype=torch.bfloat16)

    def submit(uid: str, payload: bytes) -> Any:
        version = coordinator.experts[SQL].version
        return coordinator.submit_update(UpdateRequest(SQL, "w", uid, version, 1, 1.0, payload))

    def log_bytes() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(segments.glob("*.log"))}

    assert len(body(0)) >= PREWRITE_MIN  # the tiny preset's uploads take this path too
    try:
        with caplog.at_level(logging.DEBUG, logger="fedmoe.coordinator.phases"):
            acks = [submit(f"u{seed}", body(seed)) for seed in range(3)]
        timed = [r.getMessage() for r in caplog.records if r.name == "fedmoe.coordinator.phases"]
        assert len(timed) == 3 and all(" decode " in m and " log " in m for m in timed), timed
        before = log_bytes()
        nan = body(9, scale=float("nan"))  # a valid layout: refused after the write ahead
        with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
            submit("bad", nan)
        assert log_bytes() == before and coordinator.experts[SQL].version == 3
        record = list(ExpertLog(segments, keep=False).records(repair=False))[-1]
        assert record.header["ledger"]["update_id"] == "u2" and record.body == body(2)
        expert = coordinator.experts[SQL]
        assert acks[-1].state_sha256 == state_digest(expert.state) == expert.digest
    finally:
        coordinator.close(snapshot=False)  # what kill -9 leaves: the log past the snapshot
    reopened = open_coordinator(_settings(tmp_path))
    try:
        assert reopened.experts[SQL].version == 3
        assert reopened.experts[SQL].digest == acks[-1].state_sha256  # bit for bit
    finally:
        reopened.close()


def test_the_log_write_starts_before_the_api_layers_hash_and_decode_are_done(
    tmp_path: Path,
) -> None:
    """The API layer hands the body's sha256 and decode over unfinished: the body must be
    on its way to the log before the update path waits for them (so the fsync runs beside
    the decode's tail), and a decode that cannot vouch for the values (None) still ends in
    the update path's own refusal, the log as it was."""
    coordinator = open_coordinator(_settings(tmp_path))
    register_in_process(coordinator, "w", SQL)
    segments = tmp_path / "wal" / SQL
    generator = torch.Generator().manual_seed(4)
    delta = {k: torch.randn(s, generator=generator) * 1e-2 for k, s in coordinator.schema.items()}
    payload = encode_adapter(delta, dtype=torch.bfloat16)

    def pending(update_id: str, body: bytes) -> tuple[UpdateRequest, Future[Any], Future[Any]]:
        hashing, decoding = Future[str](), Future[Any]()
        version = coordinator.experts[SQL].version
        request = UpdateRequest(
            SQL, "w", update_id, version, 1, 1.0, body, hashing=hashing, decoding=decoding
        )
        return request, hashing, decoding

    def in_log(body: bytes) -> bool:
        return any(body in path.read_bytes() for path in segments.glob("*.log"))

    try:
        request, hashing, decoding = pending("u1", payload)
        submitted = POOL.submit(coordinator.submit_update, request)
        deadline = time.monotonic() + 30
        while not in_log(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert in_log(payload) and not submitted.done()  # written ahead, waiting to decode
        hashing.set_result("f" * 64)
        decoding.set_result(decode_with_norm(payload, coordinator.schema))
        ack = submitted.result(timeout=60)
        accepted = coordinator.ledger.accepted_update("u1")
        assert ack.version == 1 and accepted is not None and accepted.body_blake3 == "f" * 64
        before = {path.name: path.read_bytes() for path in segments.glob("*.log")}
        nan = encode_adapter(
            {k: torch.full(s, float("nan")) for k, s in coordinator.schema.items()}
        )
        request, hashing, decoding = pending("bad", nan)
        hashing.set_result("e" * 64)
        decoding.set_result(None)  # the decoder could not vouch for the values
        with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
            coordinator.submit_update(request)
        assert {path.name: path.read_bytes() for path in segments.glob("*.log")} == before
        assert coordinator.experts[SQL].version == 1
    finally:
        coordinator.close()


def test_the_norm_is_exact_past_float32_squares_and_refuses_non_finite_values() -> None:
    big = torch.full((4, 8), 1e30)  # finite, but its squares overflow float32
    norm = decode_with_norm(encode_adapter({"a": big}), {"a": (4, 8)})[1]
    assert norm == pytest.approx(math.sqrt(32) * float(big[0, 0]), rel=1e-12)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(AdapterValidationError, match="a: contains NaN or Inf"):
            decode_with_norm(encode_adapter({"a": big.clone().fill_(bad)}), {"a": (4, 8)})


def test_the_state_digest_is_xxh3_of_each_name_shape_and_float32_bytes_digest() -> None:
    state = {"b": torch.tensor([[1.5], [-0.0]]), "a": torch.tensor([2.0, 3.0])}
    spec = b"".join(
        f"{key}:{tuple(state[key].shape)};".encode()
        + xxhash.xxh3_128_digest(state[key].numpy().tobytes())
        for key in ("a", "b")
    )
    assert state_digest(state) == xxhash.xxh3_128_hexdigest(spec)
    assert state_digest({**state, "b": state["b"].to(torch.bfloat16)}) == state_digest(state)
