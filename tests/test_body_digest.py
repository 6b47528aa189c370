"""The digest kept with each upload's body (``fedmoe.coordinator.body_digest``).

New rows and log records keep BLAKE3 (``body_blake3``); those written before it keep
SHA-256 (``body_sha256``) and must still be checked against it: a legacy log record
whose body no longer matches is a torn tail, and a retry of an update id whose ledger row
is legacy is answered for the same bytes and refused for others (real HTTP).
"""

from __future__ import annotations

import hashlib
import sqlite3

import torch
from blake3 import blake3

from fedmoe.adapters import encode_adapter
from fedmoe.coordinator import body_digest
from fedmoe.coordinator.wal import encode_prefix, segment_records
from tests import api_helpers as api


def test_matches_checks_blake3_then_the_legacy_sha256_and_accepts_no_digest() -> None:
    body = b"an upload's bytes"
    blake, sha = blake3(body).hexdigest(), hashlib.sha256(body).hexdigest()
    assert body_digest.body_digest(body) == blake
    assert body_digest.matches({"body_blake3": blake}, body)
    assert body_digest.matches({"body_blake3": blake}, memoryview(body), digest=blake)
    assert not body_digest.matches({"body_blake3": blake}, body + b"!")
    assert not body_digest.matches({"body_blake3": sha}, body)  # not the other algorithm
    assert body_digest.matches({"body_sha256": sha}, body)
    assert not body_digest.matches({"body_sha256": sha}, body[:-1])
    assert body_digest.matches({"body_blake3": None, "body_sha256": sha}, body)
    assert body_digest.matches({}, body) and body_digest.matches({"body_sha256": None}, body)


def test_a_legacy_sha256_record_reads_back_and_a_torn_one_is_cut(tmp_path) -> None:
    whole, torn = b"first body" * 100, b"second body" * 100
    legacy = {"lsn": 1, "kind": "update", "body_sha256": hashlib.sha256(whole).hexdigest()}
    later = {"lsn": 2, "kind": "update", "body_sha256": hashlib.sha256(torn).hexdigest()}
    path = tmp_path / "1.log"
    path.write_bytes(encode_prefix(legacy, whole) + whole + encode_prefix(later, torn) + torn)
    records, filled = segment_records(path)
    assert [r.body for r in records] == [whole, torn] and filled
    damaged = torn[:-1] + b"?"  # same length, other bytes: what a torn write leaves
    path.write_bytes(encode_prefix(legacy, whole) + whole + encode_prefix(later, torn) + damaged)
    records, filled = segment_records(path)
    assert [r.body for r in records] == [whole] and not filled


def test_a_retry_against_a_legacy_sha256_ledger_row_is_checked_by_sha256(
    live_coordinator,
) -> None:
    with live_coordinator.client() as http:
        api.register(http, api.PY_WORKER, api.PY)
        body = encode_adapter(api.random_delta(api.shapes_of(http), 1), dtype=torch.bfloat16)
        headers = api.update_headers(update_id="legacy")
        first = api.upload(http, api.PY, body, headers)
        assert first.status_code == 200, first.text
        # the row as a coordinator from before BLAKE3 wrote it
        with sqlite3.connect(live_coordinator.state_dir / "ledger.sqlite3") as db:
            db.execute(
                "UPDATE updates SET body_blake3 = NULL, body_sha256 = ? WHERE update_id = ?",
                (hashlib.sha256(body).hexdigest(), "legacy"),
            )
        again = api.upload(http, api.PY, body, headers)
        assert again.json() == first.json() | {"replayed": True}
        other = encode_adapter(api.random_delta(api.shapes_of(http), 2), dtype=torch.bfloat16)
        api.assert_error(
            api.upload(http, api.PY, other, headers), 409, "duplicate_update_id", "different body"
        )
