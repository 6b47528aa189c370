"""CentralCoordinator: experts, the gateway, and the staleness-aware update rule.

Every accepted update is written to the expert's file and committed to the
ledger before ``submit_update`` returns, so an acknowledged update is never lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torch

from fedmoe import aggregate
from fedmoe.adapters import AdapterSchema, decode_adapter, float32_bytes, schema_of
from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings
from fedmoe.coordinator import errors, restore
from fedmoe.coordinator.evaluations import EvaluationLog
from fedmoe.coordinator.ledger import Ledger, StrategyRow, UpdateRecord
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.signatures import SignatureBook
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.strategies import StrategyBook
from fedmoe.coordinator.versions import (
    GATEWAY_SAFE_BOUND,
    MAX_NUM_TOKENS,
    SAFE_ABS_BOUND,
    LazyGateway,
    UpdateRequest,
    Versioned,
)
from fedmoe.coordinator.workers import WorkerRegistry
from fedmoe.fingerprint import fingerprint_differences
from fedmoe.schemas import (
    ExpertStatus,
    ExpertSummary,
    GatewayInfo,
    LedgerRow,
    LoraConfigBody,
    RegistrationAck,
    SchemaInfo,
    StalenessInfo,
    StatusInfo,
    UpdateAck,
    WorkerRegistration,
)
from fedmoe.server_strategy import AsyncStrategy, FedBuffStrategy, Outcome, StrategyState
from fedmoe.state_digest import state_digest
from fedmoe.strategy import GatewayMerge

logger = logging.getLogger(__name__)


class CentralCoordinator:
    """The coordinator's state and rules, independent of HTTP."""

    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        base_model: str,
        fingerprint: str,
        initial: AdapterState,
        ledger: Ledger,
        store: AdapterStore,
    ) -> None:
        self.settings = settings
        self.base_model = base_model
        self.fingerprint = fingerprint
        self.lora: LoraSettings = settings.lora
        self.schema: AdapterSchema = schema_of(initial)
        self.decay = settings.staleness_decay()
        self.merger = GatewayMerge(method=settings.merge_method, lora=self.lora)
        self.ledger, self.store = ledger, store
        # One lock per expert serialises its updates (apply, encode, fsync) while other
        # experts' updates run in parallel; the commit lock orders ledger commits and
        # gateway versions and guards the swap of ``experts`` / ``gateway``.
        self._expert_locks = {name: threading.Lock() for name in settings.experts}
        self._commit_lock = threading.Lock()
        self.workers = WorkerRegistry(
            ledger, max_workers=settings.max_workers, worker_ttl=settings.worker_ttl
        )
        self.state_lock: TextIO | None = None  # see lock_state_dir
        self.run_id = restore.check_identity(
            ledger, settings.state_dir, fingerprint=fingerprint, lora=self.lora
        )
        self.experts = restore.restore_experts(
            ledger, store, settings.experts, initial=initial, schema=self.schema
        )
        self.gateway = self._restore_gateway()
        self.strategies = StrategyBook(settings, ledger)  # server aggregation and its state
        self._closing = threading.Event()
        self._timer: threading.Thread | None = None
        if isinstance(self.strategies.strategy, FedBuffStrategy):
            # applies a buffer that waited --buffer-timeout even if no upload comes after it
            period = min(5.0, settings.buffer_timeout / 4)
            self._timer = threading.Thread(
                target=self._flush_loop, args=(period,), name="buffer-timer", daemon=True
            )
            self._timer.start()
        self.evaluations = EvaluationLog(ledger.path)  # federated evaluation reports
        self.signatures = SignatureBook(
            settings.state_dir,
            settings.experts,
            fingerprint=fingerprint,
            min_count=settings.signature_min_count,
        )

    # --- start-up ------------------------------------------------------------------------

    def _restore_gateway(self) -> LazyGateway:
        row = self.ledger.gateway_row()
        built_from = self._built_from()
        if row is None or row[1] != built_from:
            version = (row[0] + 1) if row else 0
            self.ledger.set_gateway(version, built_from)
        else:
            version = row[0]
        gateway = self._gateway(version, built_from, self.experts)
        bounds = [self.experts[name].abs_bound for name in self.settings.experts]
        states = [self.experts[name].state for name in self.settings.experts]
        if not self._merge_is_finite(states, bounds):
            raise errors.StateDirError(
                f"the {self.merger.method} gateway of these experts would be non-finite "
                "(float32 overflow in the merge); choose another --merge-method"
            )
        if self.settings.eager_gateway:
            self.store.save_gateway_later(gateway)
        return gateway

    def close(self) -> None:
        """Flush background writes and close the ledger."""
        self._closing.set()
        if self._timer is not None:
            self._timer.join(timeout=30)  # a flush in progress finishes before the ledger closes
        self.store.close()
        self.evaluations.close()
        self.ledger.close()
        if self.state_lock is not None:
            self.state_lock.close()

    # --- gateway ---------------------------------------------------------------------------

    def _built_from(self, experts: dict[str, Versioned] | None = None) -> dict[str, Any]:
        experts = experts if experts is not None else self.experts
        weights = aggregate.normalize_weights(self.settings.expert_weights())
        return {
            "merge_method": self.merger.method,
            "weights": dict(zip(self.settings.experts, weights)),
            "expert_versions": {name: experts[name].version for name in self.settings.experts},
        }

    def _gateway(
        self, version: int, built_from: dict[str, Any], experts: dict[str, Versioned]
    ) -> LazyGateway:
        weights = self.settings.expert_weights()
        sources = [experts[name].state for name in self.settings.experts]
        return LazyGateway(
            version, built_from, sources, lambda states: self.merger.merge(states, weights)
        )

    def gateway_rank_alpha(self) -> tuple[int, float]:
        """Rank and alpha of the gateway adapter's PEFT config."""
        return self.merger.gateway_rank_alpha(len(self.settings.experts))

    # --- workers ---------------------------------------------------------------------------

    def register_worker(
        self, registration: WorkerRegistration, *, may_change_expert: bool = True
    ) -> RegistrationAck:
        """Admit a worker whose base model and LoRA shape match ours.

        A worker already registered for another expert moves only when
        ``may_change_expert`` (an admin asked); a new worker past ``max_workers`` is refused.
        """
        worker_id, specialty = registration.worker_id, registration.specialty
        self._expert(specialty)
        problems = fingerprint_differences(self.fingerprint, registration.base_model_fingerprint)
        lora = LoraSettings.from_dict(registration.lora_config.model_dump())
        problems += self.lora.differences(lora)
        if problems:
            raise errors.IncompatibleWorkerError(
                f"worker {worker_id} is incompatible with this coordinator: " + "; ".join(problems)
            )
        self.workers.admit(worker_id, specialty, may_change_expert=may_change_expert)
        logger.info("worker %s registered for %s", worker_id, specialty)
        return RegistrationAck(
            worker_id=worker_id,
            specialty=specialty,
            expert_version=self.experts[specialty].version,
            run_id=self.run_id,
        )

    def _expert(self, name: str) -> Versioned:
        if name not in self.experts:
            raise errors.UnknownExpertError(
                f"unknown expert {name!r}; this coordinator has {sorted(self.experts)}"
            )
        return self.experts[name]

    # --- updates ---------------------------------------------------------------------------

    def submit_update(self, request: UpdateRequest) -> UpdateAck:
        """Validate, weight and apply one update; return the acknowledgement.

        A retried ``update_id`` gets its first answer back and is not applied again.
        Any error leaves experts, gateway, ledger and files exactly as they were
        (policy rejections are recorded in the ledger, nothing else changes).
        """
        self._expert(request.expert)
        self.workers.check(request.worker_id, request.expert)
        replay = self._replay(request)
        if replay is not None:
            return replay
        self._check_base_version(request)
        delta = self._decode(request.body)
        with self._expert_locks[request.expert]:
            return self._replay(request) or self._apply(request, delta)

    def _replay(self, request: UpdateRequest) -> UpdateAck | None:
        """The first answer to an already applied update id (only to the worker that sent it,
        only for the same body)."""
        first = self.ledger.accepted_update(request.update_id)
        if first is None:
            return None
        if (first.worker_id, first.expert) != (request.worker_id, request.expert):
            raise _duplicate_id(request.update_id)
        if first.body_sha256 is not None and first.body_sha256 != request.body_sha256:
            raise errors.DuplicateUpdateIdError(
                f"update id {request.update_id!r} was already applied with a different body "
                f"(sha256 {first.body_sha256[:16]}…, this one {request.body_sha256[:16]}…); "
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

    def _decode(self, body: bytes) -> AdapterState:
        try:
            return decode_adapter(body, self.schema)
        except ValueError as error:
            raise errors.InvalidUpdateError(str(error)) from None

    def _apply(self, request: UpdateRequest, delta: AdapterState) -> UpdateAck:
        expert = self.experts[request.expert]
        staleness = expert.version - request.base_version
        norm = aggregate.global_norm(delta)
        record = UpdateRecord(
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
            body_sha256=request.body_sha256,
            dp_epsilon=request.dp_epsilon,
        )
        self._enforce_policies(record)
        clip = self._clip_factor(norm)
        record.clipped = clip < 1.0
        contribution = self.strategies.contribution(
            update_id=request.update_id,
            worker_id=request.worker_id,
            expert=request.expert,
            delta=delta,
            decay=self.decay(staleness),
            clip=clip,
            num_tokens=request.num_tokens,
        )
        strategy = self.strategies.strategy
        outcome = strategy.receive(
            expert.state, contribution, self.strategies.states[request.expert]
        )
        record.weight = outcome.weight
        if outcome.params is None:
            return self._buffer(record, outcome)
        new_state = outcome.params
        # θ + w·Δ moves by at most w·‖Δ‖; an optimizer's step has no such bound: scan it
        plain = isinstance(strategy, AsyncStrategy) and not strategy.stateful
        step = record.weight * norm if plain else math.inf
        bound = self._overflow_guard(expert, new_state, step, request)
        self._gateway_guard(request, new_state, bound)
        version = expert.version + 1
        payload = self.store.save_expert(request.expert, version, new_state)
        new_expert = Versioned.from_payload(version, payload, abs_bound=bound)
        if staleness == 0:  # the sender's pull is all that came before: it can rebuild this
            record.state_sha256 = state_digest(new_expert.state)
        record.accepted, record.expert_version = True, version
        try:
            row = self.strategies.prepare(request.expert, outcome.state, outcome.fill)
        except BaseException:
            self.store.expert_path(request.expert, version).unlink(missing_ok=True)
            raise
        self._commit(record, new_expert, row)
        self.strategies.publish(request.expert, outcome.state, row)
        try:
            self.store.prune_expert(request.expert, new_expert.version)
        except OSError as error:  # committed already: a stale file is harmless, pruned later
            logger.warning("could not prune old files of %s: %r", request.expert, error)
        assert record.response is not None
        return record.response

    def _buffer(self, record: UpdateRecord, outcome: Outcome) -> UpdateAck:
        """Durably keep an update in its expert's buffer (version unchanged); the ack says so."""
        row = self.strategies.prepare(record.expert, outcome.state, outcome.fill)
        assert row is not None, "a buffering strategy keeps state"
        record.accepted, record.buffered, record.buffer_fill = True, True, outcome.fill
        record.expert_version = self.experts[record.expert].version
        with self._commit_lock:
            try:
                if self.ledger.accepted_update(record.update_id) is not None:
                    raise _duplicate_id(record.update_id)
                record.gateway_version = self.gateway.version
                record.response = record.acknowledgement()
                self.ledger.commit_buffered(record, row)
            except BaseException:
                self.strategies.discard(row)
                raise
        self.strategies.publish(record.expert, outcome.state, row)
        return record.response

    def _flush_loop(self, period: float) -> None:
        while not self._closing.wait(period):
            try:
                self.flush_due_buffers()
            except Exception:  # e.g. a full disk: the buffer stays, the next tick retries
                logger.exception("could not apply a timed-out buffer")

    def flush_due_buffers(self) -> list[str]:
        """Apply every FedBuff buffer that has waited --buffer-timeout; the experts flushed."""
        strategy = self.strategies.strategy
        flushed: list[str] = []
        if not isinstance(strategy, FedBuffStrategy):
            return flushed
        for name in self.settings.experts:
            with self._expert_locks[name]:
                state = self.strategies.states[name]
                if strategy.due(state, time.time()) and not self._closing.is_set():
                    lr = self.strategies.flush_lr(name, len(state.update_ids))
                    params, emptied = strategy.apply(self.experts[name].state, state, lr)
                    self._commit_flush(name, params, emptied)
                    flushed.append(name)
        return flushed

    def _commit_flush(self, name: str, params: AdapterState, state: StrategyState) -> None:
        """Durably publish an expert stepped by a timed-out buffer, as ``_commit`` does."""
        bound = aggregate.max_abs(params)
        names, current = self.settings.experts, self.experts
        states = [params if n == name else current[n].state for n in names]
        bounds = [bound if n == name else current[n].abs_bound for n in names]
        if not math.isfinite(bound) or not self._merge_is_finite(states, bounds):
            raise errors.InvalidUpdateError(f"the buffer of {name} would overflow float32")
        version = current[name].version + 1
        payload = self.store.save_expert(name, version, params)
        row = None
        with self._commit_lock:
            try:
                row = self.strategies.prepare(name, state, 0)
                assert row is not None, "a buffering strategy keeps state"
                experts = {**self.experts, name: Versioned.from_payload(version, payload, bound)}
                built_from = self._built_from(experts)
                gateway = self._gateway(self.gateway.version + 1, built_from, experts)
                self.ledger.commit_flush(row, version, gateway.version, built_from)
            except BaseException:
                self.store.expert_path(name, version).unlink(missing_ok=True)
                self.strategies.discard(row)
                raise
            self.experts, self.gateway = experts, gateway
            if self.settings.eager_gateway:
                self.store.save_gateway_later(gateway)
        self.strategies.publish(name, state, row)
        self.store.prune_expert(name, version)
        logger.info("applied the timed-out buffer of %s: version %d", name, version)

    def _commit(
        self, record: UpdateRecord, new_expert: Versioned, strategy: StrategyRow | None = None
    ) -> None:
        """Commit an applied update to the ledger and publish the expert and a new gateway."""
        with self._commit_lock:
            try:
                if self.ledger.accepted_update(record.update_id) is not None:
                    # the same id raced in for another expert and committed first
                    raise _duplicate_id(record.update_id)
                experts = {**self.experts, record.expert: new_expert}
                built_from = self._built_from(experts)
                gateway = self._gateway(self.gateway.version + 1, built_from, experts)
                record.gateway_version = gateway.version
                record.response = record.acknowledgement()
                self.ledger.commit_accepted(record, built_from, strategy)
            except BaseException:
                # not in the ledger, so not current: remove the files written for it
                self.store.expert_path(record.expert, new_expert.version).unlink(missing_ok=True)
                self.strategies.discard(strategy)
                raise
            self.experts, self.gateway = experts, gateway
            if self.settings.eager_gateway:  # else merged only when downloaded
                self.store.save_gateway_later(gateway)

    def _overflow_guard(
        self, expert: Versioned, new_state: AdapterState, step: float, request: UpdateRequest
    ) -> float:
        """A bound of max|θ| after the update; scans for Inf only where overflow is possible.

        A finite delta can still overflow float32 when applied, and Inf/NaN must never be
        stored. max|θ + w·Δ| <= max|θ| + w·‖Δ‖, so while that bound is far from the float32
        limit the new state is finite without looking at it.
        """
        bound = expert.abs_bound + step
        if bound < SAFE_ABS_BOUND:
            return bound
        self._check_finite(new_state, request)
        return aggregate.max_abs(new_state)

    def _gateway_guard(self, request: UpdateRequest, new_state: AdapterState, bound: float) -> None:
        """Refuse an update after which the gateway merge would not be finite."""
        names = self.settings.experts
        states = [new_state if n == request.expert else self.experts[n].state for n in names]
        bounds = [bound if n == request.expert else self.experts[n].abs_bound for n in names]
        if not self._merge_is_finite(states, bounds):
            raise errors.InvalidUpdateError(
                f"applying update {request.update_id} would make the {self.merger.method} "
                f"gateway non-finite (float32 overflow in the merge); send a smaller delta"
            )

    def _merge_is_finite(self, states: list[AdapterState], bounds: Sequence[float]) -> bool:
        """Whether merging ``states`` gives finite tensors; merges only near float32's limit."""
        if max(bounds) < GATEWAY_SAFE_BOUND:
            return True
        merged = self.merger.merge(states, self.settings.expert_weights())
        return all(bool(torch.isfinite(tensor).all()) for tensor in merged.values())

    @staticmethod
    def _check_finite(state: AdapterState, request: UpdateRequest) -> None:
        for key, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise errors.InvalidUpdateError(
                    f"applying update {request.update_id} would make {key} of expert "
                    f"{request.expert} non-finite (float32 overflow); send a smaller delta"
                )

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

    # --- reads -----------------------------------------------------------------------------

    def expert_payload(self, name: str) -> tuple[int, bytes, str]:
        """The expert's version, safetensors bytes and ETag."""
        expert = self._expert(name)
        return expert.version, expert.payload, self.etag(name, expert.version)

    def gateway_payload(self) -> tuple[int, bytes, str]:
        """The gateway's version, safetensors bytes and ETag."""
        gateway = self.gateway  # merged outside any coordinator lock: uploads go on
        payload = gateway.encoded()
        self.store.save_gateway_later(gateway)  # merged already: the file costs only a write
        return gateway.version, payload, self.etag("gateway", gateway.version)

    def etag(self, name: str, version: int) -> str:
        """A strong ETag unique to this state dir, adapter and version."""
        return f'"{self.run_id}-{name}-{version}"'

    def gateway_info(self) -> GatewayInfo:
        """The gateway's version, merge method, weights and the expert versions it holds."""
        rank, alpha = self.gateway_rank_alpha()
        gateway = self.gateway
        return GatewayInfo(
            version=gateway.version, **gateway.extra, lora_rank=rank, lora_alpha=alpha
        )

    def expert_summaries(self) -> list[ExpertSummary]:
        """Every expert's name and current version."""
        experts = self.experts
        return [ExpertSummary(name=name, version=experts[name].version) for name in experts]

    def schema_info(self) -> SchemaInfo:
        """What a worker needs to build a compatible adapter."""
        return SchemaInfo(
            base_model=self.base_model,
            base_model_fingerprint=self.fingerprint,
            lora_config=LoraConfigBody.model_validate(self.lora.to_dict()),
            peft_config=self.lora.to_peft().to_dict()
            | {"target_modules": list(self.lora.target_modules)},
            tensors={key: list(shape) for key, shape in self.schema.items()},
            max_body_bytes=self.max_body_bytes,
        )

    @property
    def max_body_bytes(self) -> int:
        """The upload size limit."""
        if self.settings.max_body_bytes:
            return self.settings.max_body_bytes
        return 4 * float32_bytes(self.schema) + 64 * 1024

    def ledger_rows(self, limit: int = 100) -> list[LedgerRow]:
        """The newest ledger rows (accepted and policy-rejected updates), newest first."""
        return self.ledger.updates(limit=limit)

    def status(self, *, workers_offset: int = 0, workers_limit: int = 1000) -> StatusInfo:
        """Experts, gateway, a page of the workers, base model and LoRA config."""
        self.workers.forget_idle()
        rows, counts = self.ledger.expert_rows(), self.ledger.worker_counts()
        workers = self.ledger.workers(offset=workers_offset, limit=workers_limit)
        experts = {
            name: ExpertStatus(
                version=self.experts[name].version,
                updates_applied=rows[name]["accepted"],
                updates_rejected=rows[name]["rejected"],
                workers=[w for w, info in workers.items() if info.specialty == name],
                worker_count=counts.get(name, 0),
                strategy=self.strategies.status(name),
            )
            for name in self.settings.experts
        }
        staleness = self.decay.describe() | {
            "server_lr": self.settings.effective_server_lr,
            "max_staleness": self.settings.max_staleness,
        }
        return StatusInfo(
            run_id=self.run_id,
            base_model=self.base_model,
            base_model_fingerprint=self.fingerprint,
            lora_config=LoraConfigBody.model_validate(self.lora.to_dict()),
            staleness=StalenessInfo.model_validate(staleness),
            experts=experts,
            gateway=self.gateway_info(),
            workers=workers,
            workers_total=sum(counts.values()),
            workers_offset=workers_offset,
            workers_limit=workers_limit,
        )


def _duplicate_id(update_id: str) -> errors.DuplicateUpdateIdError:
    return errors.DuplicateUpdateIdError(
        f"update id {update_id!r} was already used by another worker or expert; "
        "every upload needs a new unique id"
    )
