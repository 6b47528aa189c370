"""The update path of the coordinator: validate, weigh, apply, log, commit, acknowledge.

An accepted update is durable when its write-ahead log record is fsynced
(``Journal.append_update``, one fsync); its SQLite row follows without an fsync of its
own, then the acknowledgement. A big body is written to the log ahead of its record
while it is decoded and applied (``Journal.prewrite``; cut off again if it is refused),
so the fsync the acknowledgement waits for has little left to write. The full expert is
written later, in the background (snapshots). ``UpdatePath`` is a mixin of
``CentralCoordinator``: the attributes declared below are the coordinator's.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fedmoe.adapters import AdapterSchema, Buffer, check_layout, decode_with_norm
from fedmoe.aggregate import AdapterState
from fedmoe.coordinator import body_digest, errors, guards, phases
from fedmoe.coordinator.journal import Journal
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.ledger_rows import UpdateRecord
from fedmoe.coordinator.replay import Head
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.strategies import StrategyBook
from fedmoe.coordinator.versions import (
    MAX_NUM_TOKENS,
    LazyGateway,
    UpdateRequest,
    Versioned,
)
from fedmoe.coordinator.wal import Prewritten
from fedmoe.coordinator.workers import WorkerRegistry
from fedmoe.schemas import UpdateAck
from fedmoe.server_strategy import (
    AsyncStrategy,
    Contribution,
    Outcome,
    RoundClose,
    StrategyState,
)
from fedmoe.strategy import GatewayMerge, StalenessDecay

logger = logging.getLogger(__name__)
Settle = Callable[[], None]  # an applied update's strategy state, finished and published


class UpdatePath:
    """Submitting updates and flushing timed-out buffers (mixed into the coordinator)."""

    settings: CoordinatorSettings
    schema: AdapterSchema
    decay: StalenessDecay
    merger: GatewayMerge
    ledger: Ledger
    store: AdapterStore
    journal: Journal
    strategies: StrategyBook
    workers: WorkerRegistry
    experts: dict[str, Versioned]
    gateway: LazyGateway
    _expert_locks: dict[str, threading.Lock]
    _commit_lock: threading.Lock
    _hasher: ThreadPoolExecutor
    _settler: ThreadPoolExecutor
    _unsettled: dict[str, str]  # experts whose strategy state could not be finished: why
    _expert: Callable[[str], Versioned]
    _built_from: Callable[[dict[str, Versioned] | None], dict[str, Any]]
    _gateway: Callable[[int, dict[str, Any], dict[str, Versioned]], LazyGateway]

    def submit_update(self, request: UpdateRequest) -> UpdateAck:
        """Validate, weight and apply one update; return the acknowledgement.

        A retried ``update_id`` gets its first answer back and is not applied again.
        Any error leaves experts, gateway, ledger and files exactly as they were
        (policy rejections are recorded in the ledger, nothing else changes).
        """
        phases.begin()
        try:
            return self._submit(request)
        finally:
            phases.end(f"update {request.update_id}")

    def _submit(self, request: UpdateRequest) -> UpdateAck:
        self._expert(request.expert)
        self.workers.check(request.worker_id, request.expert)
        replay = self._replay(request)
        if replay is not None:
            return replay
        self._check_base_version(request)
        if request.decoding is None:  # (else the API layer's upload buffer checked it)
            self._check_layout(request.body)  # names, shapes, dtypes: before anything is written
        phases.mark("checks")
        lock = self._expert_locks[request.expert]
        lock.acquire()
        try:
            phases.mark("lock")
            ack, later = self._submit_locked(request)
        except BaseException:
            lock.release()
            raise
        if later is None:
            lock.release()
        else:  # acknowledged now; the expert's next update waits for the rest
            try:
                self._settler.submit(self._settle, request.expert, later, lock)
            except RuntimeError:  # shutting down: no thread to hand it to
                self._settle(request.expert, later, lock)
        return ack

    def _submit_locked(self, request: UpdateRequest) -> tuple[UpdateAck, Settle | None]:
        """The update under its expert's lock: the acknowledgement, and the strategy state
        work left for after it (``_settle``), if any."""
        self._check_available(request.expert)
        self.workers.check(request.worker_id, request.expert)  # not forgotten meanwhile
        replay = self._replay(request)
        if replay is not None:
            return replay, None
        # the body goes to the log (a helper thread) while its decode is finished
        prewritten = self.journal.prewrite(request.expert, request.body)
        try:
            delta, norm = request.decoded() or self._decode(request.body)
            phases.mark("decode")
            return self._apply(request, delta, norm, prewritten)
        except BaseException:
            self.journal.discard(request.expert, prewritten)  # refused: cut off again
            raise

    def _settle(self, expert: str, later: Settle, lock: threading.Lock) -> None:
        """Finish an acknowledged update's strategy state, then release its expert's lock.

        Should that fail (say, out of memory), the live state no longer matches what
        replaying the log computes: the expert refuses updates until a restart replays it.
        """
        try:
            later()
        except BaseException as error:
            logger.exception("could not finish the strategy state of %s", expert)
            self._unsettled[expert] = f"{type(error).__name__}: {error}"
        finally:
            lock.release()

    def _check_available(self, expert: str) -> None:
        if expert in self._unsettled:
            raise errors.ExpertUnavailableError(
                f"expert {expert} takes no updates: its strategy state could not be finished "
                f"after an acknowledged update ({self._unsettled[expert]}); restart the "
                "coordinator, which recomputes it from the write-ahead log"
            )

    def _replay(self, request: UpdateRequest) -> UpdateAck | None:
        """The first answer to an already applied update id (only to the worker that sent it,
        only for the same body)."""
        first = self.ledger.accepted_update(request.update_id)
        if first is None:
            return None
        if (first.worker_id, first.expert) != (request.worker_id, request.expert):
            raise _duplicate_id(request.update_id)
        kept = {body_digest.KEY: first.body_blake3, body_digest.LEGACY_KEY: first.body_sha256}
        if not body_digest.matches(kept, request.body, request.body_blake3):
            raise errors.DuplicateUpdateIdError(
                f"update id {request.update_id!r} was already applied with a different body "
                f"(BLAKE3 {request.body_blake3[:16]}… differs from the first one's); "
                "a retry must resend the same bytes, a new update needs a new id"
            )
        return first.response.model_copy(update={"replayed": True})

    def _check_base_version(self, request: UpdateRequest) -> None:
        current = self.experts[request.expert].version
        if request.base_version < 0 or request.base_version > current:
            raise errors.InvalidUpdateError(
                f"base version {request.base_version} is invalid: expert {request.expert} "
                f"is at version {current} (must be 0..{current})"
            )
        if not 0 <= request.num_tokens <= MAX_NUM_TOKENS:
            raise errors.InvalidUpdateError(
                f"num_tokens must be in 0..{MAX_NUM_TOKENS}, got {request.num_tokens}"
            )

    def _check_layout(self, body: Buffer) -> None:
        """The body's safetensors header against the schema (no tensor data read)."""
        try:
            check_layout(body, self.schema)
        except ValueError as error:
            raise errors.InvalidUpdateError(str(error)) from None

    def _decode(self, body: Buffer) -> tuple[AdapterState, float]:
        """The float32 delta and its L2 norm (the norm is the finiteness check)."""
        try:
            return decode_with_norm(body, self.schema)
        except ValueError as error:
            raise errors.InvalidUpdateError(str(error)) from None

    def _record(self, request: UpdateRequest, staleness: int, norm: float) -> UpdateRecord:
        return UpdateRecord(
            update_id=request.update_id,
            worker_id=request.worker_id,
            expert=request.expert,
            base_version=request.base_version,
            staleness=staleness,
            weight=0.0,
            update_norm=norm,
            clipped=False,
            train_loss=request.train_loss,
            num_tokens=request.num_tokens,
            accepted=False,
            body_blake3=request.body_blake3,
            dp_epsilon=request.dp_epsilon,
            final=request.final,
        )

    def _apply(
        self,
        request: UpdateRequest,
        delta: AdapterState,
        norm: float,
        prewritten: Prewritten | None,
    ) -> tuple[UpdateAck, Settle | None]:
        expert = self.experts[request.expert]
        staleness = expert.version - request.base_version
        record = self._record(request, staleness, norm)
        self._enforce_policies(record)
        clip = self._clip_factor(norm)
        record.clipped = clip < 1.0
        contribution = self.strategies.contribution(
            update_id=request.update_id,
            worker_id=request.worker_id,
            expert=request.expert,
            delta=delta,
            base_version=request.base_version,
            staleness=staleness,
            clip=clip,
            num_tokens=request.num_tokens,
            norm=norm,
        )
        strategy = self.strategies.strategy
        outcome = strategy.begin(expert.state, contribution, self.strategies.states[request.expert])
        record.weight, record.active_workers = outcome.weight, contribution.active_workers
        phases.mark("apply")
        if outcome.params is None:
            return self._buffer(record, outcome, contribution, request.body, prewritten), None
        new_state = outcome.params
        # θ + w·Δ moves by at most w·‖Δ‖; an optimizer's step has no such bound: scan it
        plain = isinstance(strategy, AsyncStrategy) and not strategy.optimizer.stateful
        step = record.weight * norm if plain and outcome.close is None else math.inf
        bound = guards.new_abs_bound(
            expert.abs_bound, step, new_state, update_id=request.update_id, expert=request.expert
        )
        self._gateway_guard(request, new_state, bound)
        phases.mark("guards")
        version = expert.version + 1
        new_expert = Versioned(version, new_state, bound, name=request.expert)
        record.accepted, record.expert_version = True, version
        record.settle_version = version + contribution.round_left
        self._commit(record, new_expert, contribution, request.body, prewritten, outcome.close)
        assert record.response is not None
        self.strategies.publish(request.expert, outcome.state, self.journal.lsns[request.expert])
        if outcome.later is None:
            return record.response, None
        return record.response, lambda: self.strategies.settle(
            request.expert, outcome.settled().state
        )

    def _buffer(
        self,
        record: UpdateRecord,
        outcome: Outcome,
        contribution: Contribution,
        body: Buffer,
        prewritten: Prewritten | None,
    ) -> UpdateAck:
        """Durably keep an update in its expert's buffer (version unchanged); the ack says so."""
        record.accepted, record.buffered, record.buffer_fill = True, True, outcome.fill
        record.expert_version = self.experts[record.expert].version
        record.settle_version = record.expert_version + 1  # the buffer's application
        with self._commit_lock:
            if self.ledger.accepted_update(record.update_id) is not None:
                raise _duplicate_id(record.update_id)
            record.gateway_version = self.gateway.version
            record.response = record.acknowledgement()
            appended = self.journal.append_update(
                record, contribution, applied=False, body=body, prewritten=prewritten
            )
            try:
                self.ledger.commit_buffered(record, None)
            except BaseException:
                self.journal.undo(record.expert, appended)
                raise
            self.journal.committed(record.expert)
        self.strategies.publish(record.expert, outcome.state, self.journal.lsns[record.expert])
        return record.response

    def _commit(
        self,
        record: UpdateRecord,
        new_expert: Versioned,
        contribution: Contribution,
        body: Buffer,
        prewritten: Prewritten | None,
        close: RoundClose | None = None,
    ) -> None:
        """Log (one fsync) and commit an applied update; publish the expert and a gateway.
        ``close``: how it closed a FedAvg round (for incremental pulls)."""
        with self._commit_lock:
            if self.ledger.accepted_update(record.update_id) is not None:
                # the same id raced in for another expert and committed first
                raise _duplicate_id(record.update_id)
            experts = {**self.experts, record.expert: new_expert}
            built_from = self._built_from(experts)
            gateway = self._gateway(self.gateway.version + 1, built_from, experts)
            record.gateway_version = gateway.version
            # at staleness 0 the sender's pull is all that came before: it can rebuild the
            # new expert from the acknowledgement and check this digest. It is hashed while
            # the log record is written and fsynced (both release the GIL); replay makes it
            # again for a row the log has to restore.
            digest = (
                self._hasher.submit(lambda: new_expert.digest) if record.staleness == 0 else None
            )
            appended = self.journal.append_update(
                record, contribution, applied=True, body=body, prewritten=prewritten, close=close
            )
            phases.mark("log")
            try:
                record.state_sha256 = digest.result() if digest is not None else None
                phases.mark("digest")
                record.response = record.acknowledgement()
                self.ledger.commit_accepted(record, built_from)
                phases.mark("ledger")
            except BaseException:
                self.journal.undo(record.expert, appended)  # never acknowledged: not applied
                raise
            self.journal.committed(record.expert)
            self.experts, self.gateway = experts, gateway
            if self.settings.eager_gateway:  # else merged only when downloaded
                self.store.save_gateway_later(gateway)

    def strategy_state(self, name: str) -> StrategyState:
        """The expert's strategy state once its last update's work is done (waits for it)."""
        with self._expert_locks[name]:
            return self.strategies.states[name]

    def capture(self, name: str) -> Head:
        """The expert's state, strategy state and lsn, taken together under its lock; the
        log rolls to a new segment so that a snapshot of this head can retire the old one."""
        with self._expert_locks[name]:
            self._check_available(name)  # an unfinished state is not kept: replay remakes it
            head = Head(self.experts[name], self.strategies.states[name], self.journal.lsns[name])
            self.journal.logs[name].roll()
            return head

    def _gateway_guard(self, request: UpdateRequest, new_state: AdapterState, bound: float) -> None:
        """Refuse an update after which the gateway merge would not be finite."""
        if not self._gateway_is_finite({request.expert: (new_state, bound)}):
            raise errors.InvalidUpdateError(
                f"applying update {request.update_id} would make the {self.merger.method} "
                f"gateway non-finite (float32 overflow in the merge); send a smaller delta"
            )

    def _gateway_is_finite(self, changed: dict[str, tuple[AdapterState, float]]) -> bool:
        """Whether the gateway of the current experts, with the ``changed`` ones replaced by
        (state, max|θ| bound), merges to finite tensors (``guards.merge_is_finite``)."""
        names, experts = self.settings.experts, self.experts
        states = [changed[n][0] if n in changed else experts[n].state for n in names]
        bounds = [changed[n][1] if n in changed else experts[n].abs_bound for n in names]
        return guards.merge_is_finite(self.merger, self.settings.expert_weights(), states, bounds)

    def _enforce_policies(self, record: UpdateRecord) -> None:
        bound = self.settings.max_staleness
        if bound is not None and record.staleness > bound:
            record.reason = f"staleness {record.staleness} exceeds max_staleness {bound}"
            self.ledger.commit_rejected(record)
            raise errors.StaleUpdateError(record.reason)
        limit = self.settings.max_update_norm
        if (
            limit is not None
            and record.update_norm > limit
            and self.settings.norm_policy == "reject"
        ):
            record.reason = f"update norm {record.update_norm:.4g} exceeds max_update_norm {limit}"
            self.ledger.commit_rejected(record)
            raise errors.RejectedUpdateError(record.reason)

    def _clip_factor(self, norm: float) -> float:
        limit = self.settings.max_update_norm
        return limit / norm if limit is not None and norm > limit else 1.0


def _duplicate_id(update_id: str) -> errors.DuplicateUpdateIdError:
    return errors.DuplicateUpdateIdError(
        f"update id {update_id!r} was already used by another worker or expert; "
        "every upload needs a new unique id"
    )
