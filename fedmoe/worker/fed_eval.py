"""Federated evaluation on a worker: measure the global models on local validation data.

Every ``eval_every`` successful syncs, and once when the worker stops, the worker
evaluates on (at most ``eval_max_examples`` of) its own validation set:

- ``expert``: its expert exactly as last pulled from the coordinator (version known);
- ``gateway``: the merged gateway as the coordinator serves it now;
- further kinds through ``extra_kinds``: ``routed``, the routed gateway
  (``fedmoe.worker.fed_routed``), with its routing accuracy on the worker's own prompts.

Only aggregate numbers leave the machine: the loss per target token, the token and
example counts, and the versions measured. Both models are evaluated *in place* on
the training model by temporarily swapping its LoRA tensors (no second copy of the
base model, no PEFT adapter added), then the training tensors are put back exactly,
so training pays only the evaluation's own compute. A failed evaluation or report
is logged and never stops training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft import PeftModel

from fedmoe.adapters import decode_adapter, read_header
from fedmoe.batching import TokenizedExample, count_trainable_tokens
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import lora_parameters
from fedmoe.schemas import GatewayInfo

if TYPE_CHECKING:
    from fedmoe.worker.job import WorkerJob

logger = logging.getLogger(__name__)

# How often to evaluate when --eval-every is not given: about once a minute.
DEFAULT_EVAL_PERIOD_S = 60.0

# A further kind of model to evaluate (e.g. the routed gateway): returns a result dict
# with at least "kind" and "loss" (and optionally "routing_accuracy"), or None to skip.
ExtraKind = Callable[["FederatedEvaluator"], "dict[str, Any] | None"]


class EvaluationClient(Protocol):
    """What federated evaluation uses of ``fedmoe.client.CoordinatorClient``."""

    def gateway_info(self) -> GatewayInfo:
        """``GET /v1/gateway``."""
        ...

    def download(self, path: str, etag: str | None = None) -> tuple[int, bytes | None, str]:
        """GET an adapter: (version, bytes or None when unchanged, etag)."""
        ...

    def report_evaluation(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /v1/metrics/evaluations``."""
        ...


def default_eval_every(sync_interval: float) -> int:
    """Syncs between evaluations so that they happen about once a minute."""
    return max(1, round(DEFAULT_EVAL_PERIOD_S / sync_interval))


class FederatedEvaluator:
    """Evaluates and reports on schedule; call ``after_sync`` and ``finish``."""

    def __init__(
        self,
        *,
        client: EvaluationClient,
        model: PeftModel,
        examples: list[TokenizedExample],
        pad_token_id: int,
        worker_id: str,
        expert: str,
        every: int,
    ) -> None:
        self.client, self.model = client, model
        self.examples, self.pad_token_id = examples, pad_token_id
        self.worker_id, self.expert, self.every = worker_id, expert, every
        self.tokens = count_trainable_tokens(examples) if examples else 0
        self.syncs = 0
        self.reports: list[dict[str, Any]] = []  # what was sent, for the worker's summary
        self.seconds = 0.0  # time spent evaluating
        self.extra_kinds: list[ExtraKind] = []
        # The gateway as fetched by the evaluation in progress (extra kinds may use it).
        self.gateway_state: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_job(cls, job: WorkerJob) -> FederatedEvaluator:
        """The evaluator of a set-up worker job (bounded to its ``eval_max_examples``)."""
        opts = job.options
        every = opts.eval_every
        return cls(
            client=job.client,
            model=job.model,
            examples=job.eval_set[: opts.eval_max_examples],
            pad_token_id=job.pad_id,
            worker_id=opts.worker_id,
            expert=opts.specialty,
            every=default_eval_every(opts.sync_interval) if every is None else every,
        )

    def after_sync(self, expert_version: int, expert_state: Mapping[str, torch.Tensor]) -> None:
        """Count a successful sync; evaluate when ``every`` of them have passed."""
        self.syncs += 1
        if self.every > 0 and self.syncs % self.every == 0:
            self.run(expert_version, expert_state)

    def finish(self, expert_version: int, expert_state: Mapping[str, torch.Tensor]) -> None:
        """The evaluation when the worker stops (the last one's numbers if nothing moved)."""
        last = self.reports[-1] if self.reports else None
        try:
            unchanged = (
                last is not None
                and last["expert_version"] == expert_version
                and last["gateway_version"] == self.client.gateway_info().version
            )
            if unchanged and last is not None:  # e.g. the final sync just evaluated
                self.client.report_evaluation(last | {"final": True})
                self.reports.append(last | {"final": True})
                return
        except Exception as error:
            logger.warning("%s: final evaluation report failed: %r", self.worker_id, error)
            return
        self.run(expert_version, expert_state, final=True)

    def run(
        self, expert_version: int, expert_state: Mapping[str, torch.Tensor], *, final: bool = False
    ) -> dict[str, Any] | None:
        """Evaluate the expert and the gateway and report them; None if that failed."""
        if not self.examples:
            return None
        began = time.monotonic()
        try:
            report = self.evaluate(expert_version, expert_state, final=final)
            self.client.report_evaluation(report)
        except Exception as error:  # evaluation is best effort: training goes on
            logger.warning("%s: federated evaluation failed: %r", self.worker_id, error)
            return None
        finally:
            elapsed = time.monotonic() - began
            self.seconds += elapsed
        self.reports.append(report)
        losses = ", ".join(f"{r['kind']} {r['loss']:.4f}" for r in report["results"])
        logger.info(
            "%s eval (expert v%d, gateway v%d, %d tokens, %.2fs): %s",
            self.worker_id,
            expert_version,
            report["gateway_version"],
            self.tokens,
            elapsed,
            losses,
        )
        return report

    def evaluate(
        self, expert_version: int, expert_state: Mapping[str, torch.Tensor], *, final: bool
    ) -> dict[str, Any]:
        """The report body: each model's loss on the local validation examples."""
        with swapped_lora(self.model, expert_state):
            results = [self._result("expert", self.loss())]
        gateway_version, gateway_state = self.gateway()
        self.gateway_state = gateway_state
        with swapped_lora(self.model, gateway_state):
            results.append(self._result("gateway", self.loss()))
        for extra in self.extra_kinds:
            result = extra(self)
            if result is not None:
                results.append(self._result(**result))
        return {
            "worker_id": self.worker_id,
            "expert": self.expert,
            "expert_version": expert_version,
            "gateway_version": gateway_version,
            "final": final,
            "results": results,
        }

    def loss(self) -> float:
        """Mean loss per target token of the model as it is now."""
        model: Any = self.model  # a PeftModel runs as the PreTrainedModel it wraps
        return validation_loss(model, self.examples, pad_token_id=self.pad_token_id)

    def _result(
        self, kind: str, loss: float, routing_accuracy: float | None = None
    ) -> dict[str, Any]:
        result = {"kind": kind, "loss": loss, "tokens": self.tokens, "examples": len(self.examples)}
        if routing_accuracy is not None:
            result["routing_accuracy"] = routing_accuracy
        return result

    def gateway(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The gateway's version and tensors, rescaled to our adapter's alpha/r."""
        info = self.client.gateway_info()
        version, body, _ = self.client.download("/v1/gateway/adapter")
        body = body or b""
        shapes = {k: tuple(v["shape"]) for k, v in read_header(body).items() if k != "__metadata__"}
        state = decode_adapter(body, shapes)
        ours = _scaling(self.model)
        theirs = info.lora_alpha / info.lora_rank
        if abs(theirs - ours) > 1e-9 * ours:  # PEFT multiplies B·A by alpha/r
            for key in state:
                if ".lora_B." in key:
                    state[key] = state[key] * (theirs / ours)
        return version, state


def _scaling(model: PeftModel) -> float:
    config: Any = model.peft_config[model.active_adapter]
    return float(config.lora_alpha) / float(config.r)


@contextmanager
def swapped_lora(model: PeftModel, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run the model with ``state`` as its LoRA tensors (any rank), then restore them.

    The parameters' data are swapped, not copied into, so a gateway of a higher rank
    (the ``cat`` merge) fits; the same tensor objects are put back afterwards, which
    leaves the training weights and the optimizer's state untouched.
    """
    parameters = lora_parameters(model)
    if set(parameters) != set(state):
        missing = sorted(set(parameters) ^ set(state))[:3]
        raise ValueError(f"adapter keys do not match the model's LoRA parameters: {missing}")
    saved = {key: parameter.data for key, parameter in parameters.items()}
    try:
        for key, parameter in parameters.items():
            parameter.data = state[key].to(parameter.device, parameter.dtype)
        yield
    finally:
        for key, parameter in parameters.items():
            parameter.data = saved[key]
