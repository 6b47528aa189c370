"""CentralCoordinator: experts, the gateway, workers and what the API reads.

Every accepted update is in the fsynced write-ahead log before ``submit_update``
returns, so an acknowledged update is never lost (``fedmoe.coordinator.journal``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from fedmoe import aggregate
from fedmoe.adapters import AdapterSchema, float32_bytes, schema_of
from fedmoe.config import LoraSettings
from fedmoe.coordinator import changes, errors, restore
from fedmoe.coordinator.base_facts import BaseFacts
from fedmoe.coordinator.evaluations import EvaluationLog
from fedmoe.coordinator.flush import BufferTimer
from fedmoe.coordinator.forget import Forgetter
from fedmoe.coordinator.journal import Journal
from fedmoe.coordinator.ledger import Ledger
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.coordinator.signatures import SignatureBook
from fedmoe.coordinator.store import AdapterStore
from fedmoe.coordinator.strategies import StrategyBook, build_strategy
from fedmoe.coordinator.updates import UpdatePath
from fedmoe.coordinator.versions import (
    LazyGateway,
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
    WorkerRegistration,
)
from fedmoe.server_strategy import FedBuffStrategy
from fedmoe.strategy import GatewayMerge

logger = logging.getLogger(__name__)


class CentralCoordinator(UpdatePath):
    """The coordinator's state and rules, independent of HTTP (the update path is in
    ``fedmoe.coordinator.updates``, durability in ``fedmoe.coordinator.journal``)."""

    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        base: BaseFacts,
        ledger: Ledger,
        store: AdapterStore,
    ) -> None:
        self.settings = settings
        self.base_model = settings.base_model
        self.fingerprint = fingerprint = base.fingerprint
        initial = base.initial
        self.lora: LoraSettings = settings.lora
        # kept with the base facts, so a start from them needs no peft import
        self.peft_config = base.peft_config or self.lora.peft_dict()
        self.schema: AdapterSchema = schema_of(initial)
        self.decay = settings.staleness_decay()
        self.merger = GatewayMerge(method=settings.merge_method, lora=self.lora)
        self.ledger, self.store = ledger, store
        # One lock per expert serialises its updates (apply, encode, fsync) while other
        # experts' updates run in parallel; the commit lock orders ledger commits and
        # gateway versions and guards the swap of ``experts`` / ``gateway``.
        self._expert_locks = {name: threading.Lock() for name in settings.experts}
        self._commit_lock = threading.Lock()
        self._hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="state-digest")
        # strategy state work an acknowledgement need not wait for (``UpdatePath._settle``)
        self._settler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="strategy-settle")
        self._unsettled: dict[str, str] = {}
        self.workers = WorkerRegistry(
            ledger, max_workers=settings.max_workers, worker_ttl=settings.worker_ttl
        )
        self.state_lock: TextIO | None = None  # see lock_state_dir
        self.run_id = restore.check_identity(
            ledger, settings.state_dir, fingerprint=fingerprint, lora=self.lora
        )
        strategy = build_strategy(settings)
        self.journal = Journal(settings, ledger, store, list(settings.experts), strategy)
        self.experts, states = self.journal.recover(initial, self.schema)
        self.gateway = self._restore_gateway()
        # server aggregation and its state
        self.strategies = StrategyBook(settings, ledger, strategy, states, self.journal.lsns)
        self.initial = initial  # what `fedmoe forget` rebuilds an expert from
        self.forgetting = Forgetter(self)  # removed workers (after recovery: it reads lsns)
        self.journal.start(self.capture)  # background snapshots
        self.buffer_timer: BufferTimer | None = None
        if isinstance(self.strategies.strategy, FedBuffStrategy):
            # applies a buffer that waited --buffer-timeout even if no upload comes after it
            self.buffer_timer = BufferTimer(self, self.strategies.strategy)
            self.buffer_timer.start()
        self.evaluations = EvaluationLog(ledger.path)  # federated evaluation reports
        self.signatures = SignatureBook(
            settings.state_dir,
            settings.experts,
            fingerprint=fingerprint,
            min_count=settings.signature_min_count,
            hidden_size=base.hidden_size,
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
        if not self._gateway_is_finite({}):
            raise errors.StateDirError(
                f"the {self.merger.method} gateway of these experts would be non-finite "
                "(float32 overflow in the merge); choose another --merge-method"
            )
        if self.settings.eager_gateway:
            self.store.save_gateway_later(gateway)
        return gateway

    def close(self, *, snapshot: bool = True) -> None:
        """Flush background writes, snapshot every expert and close the ledger.

        ``snapshot=False`` leaves the state dir as a crash would (tests of recovery).
        """
        if self.buffer_timer is not None:
            self.buffer_timer.close()  # a flush in progress finishes before the ledger closes
        self._settler.shutdown()  # the last updates' strategy states, before any snapshot
        if snapshot:
            self.journal.close(self.capture)  # a clean stop leaves nothing to replay
        else:
            self.journal.stop()
        self._hasher.shutdown()
        self.forgetting.close()
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

    # --- reads -----------------------------------------------------------------------------

    def expert_payload(self, name: str) -> tuple[int, bytes, str]:
        """The expert's version, safetensors bytes and ETag."""
        expert = self._expert(name)
        return expert.version, expert.payload, self.etag(name, expert.version)

    def expert_changes(
        self, name: str, since: int, exclude: str | None
    ) -> tuple[int, bytes, str, int | None, str]:
        """What changed since version ``since``: (version, bytes, ETag, the version the
        bytes are a delta from or None for the full expert, the expert's state digest)."""
        expert = self._expert(name)
        strategy = self.strategies.strategy
        steps = changes.steps_since(self.journal, name, expert, strategy, since, exclude)
        if steps is None:
            return (
                expert.version,
                expert.payload,
                self.etag(name, expert.version),
                None,
                expert.digest,
            )
        etag = f'"{self.run_id}-{name}-{since}-{expert.version}-{exclude or ""}"'
        return expert.version, steps, etag, since, expert.digest

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
            peft_config=self.peft_config,
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
            "grace": self.settings.staleness_grace,
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
