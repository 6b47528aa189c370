"""Answer a prompt the way the gateway should: routed to one expert, or merged on fallback.

``answer_prompt`` asks the coordinator for every domain signature (``GET /v1/signatures``),
featurizes the prompt with the base model, lets :class:`fedmoe.routing.Router` choose, and
generates with the chosen expert's adapter. When no expert wins clearly it uses the
coordinator's fallback: the merged gateway (``GET /v1/gateway/adapter``) or a ``cat`` mix
of the top experts weighted by the router. ``merged=True`` (the CLI's ``--merged``), or a
coordinator with no signatures yet, gives the merged gateway as before.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from fedmoe.adapters import write_peft_dir
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.export import fetch_adapter_dir, generate
from fedmoe.modeling import BaseModel, load_base_model
from fedmoe.routing import RouteDecision, router_from_payload
from fedmoe.strategy import GatewayMerge

logger = logging.getLogger(__name__)


@dataclass
class GatewayAnswer:
    """A completion and what produced it."""

    text: str
    served_by: str  # an expert's name, "gateway" (merged) or "mix:<a>+<b>"
    decision: RouteDecision | None  # None when not routed (--merged, or no signatures)


def answer_prompt(
    client: CoordinatorClient,
    prompt: str,
    *,
    merged: bool = False,
    base_model: str | None = None,
    max_new_tokens: int = 64,
    device: str = "auto",
) -> GatewayAnswer:
    """Route ``prompt`` (unless ``merged``) and generate with what the router chose."""
    schema = client.schema()
    base = load_base_model(base_model or schema["base_model"], device=device)
    router = None if merged else router_from_payload(client.signatures())
    if router is not None and router.base_fingerprint != base.fingerprint:
        logger.warning("signatures were made with another base model; using the merged gateway")
        router = None
    if router is None:
        return GatewayAnswer(_generate_with(client, base, prompt, max_new_tokens), "gateway", None)
    decision = router.route_texts(base.model, base.tokenizer, [prompt])[0]
    with tempfile.TemporaryDirectory(prefix="fedmoe-routed-") as scratch:
        directory = Path(scratch) / "adapter"
        if decision.expert is not None:
            fetch_adapter_dir(client, directory, expert=decision.expert)
            served_by = decision.expert
        elif decision.fallback == "mix":
            _write_mix(client, schema, decision.weights, directory)
            served_by = "mix:" + "+".join(decision.weights)
        else:
            fetch_adapter_dir(client, directory)
            served_by = "gateway"
        model = PeftModel.from_pretrained(base.model, str(directory)).eval()
        text = generate(model, base.tokenizer, prompt, max_new_tokens=max_new_tokens)
    return GatewayAnswer(text, served_by, decision)


def _generate_with(
    client: CoordinatorClient, base: BaseModel, prompt: str, max_new_tokens: int
) -> str:
    with tempfile.TemporaryDirectory(prefix="fedmoe-gateway-") as scratch:
        fetch_adapter_dir(client, Path(scratch))
        model = PeftModel.from_pretrained(base.model, scratch).eval()
        return generate(model, base.tokenizer, prompt, max_new_tokens=max_new_tokens)


def _write_mix(
    client: CoordinatorClient, schema: dict[str, Any], weights: dict[str, float], directory: Path
) -> None:
    """The router's weighted ``cat`` mix of a few experts, as a PEFT directory."""
    lora = LoraSettings.from_dict(schema["lora_config"])
    shapes = {k: tuple(v) for k, v in schema["tensors"].items()}
    states = [client.expert_adapter(name, shapes)[1] for name in weights]
    merger = GatewayMerge(method="cat", lora=lora)
    rank, alpha = merger.gateway_rank_alpha(len(states))
    state = merger.merge(states, list(weights.values()))
    write_peft_dir(state, lora, directory, base_model=schema["base_model"], rank=rank, alpha=alpha)
