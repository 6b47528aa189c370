"""Serving speed of ``fedmoe serve``'s engine: router latency and generation tokens/s.

Measures, on the engine that ``fedmoe serve`` runs (no HTTP in the loop):

- the router (``fedmoe.routing.Router.route_texts``: base-model features of a 32-token
  prefix, then scores) per request, p50 / p99, against the time of a 64-token answer;
- generation tokens/s for one adapter (one request at a time, and three together), three
  requests for three different experts in one batch (peft's per-row ``adapter_names``),
  the merged ``cat`` gateway, and the bare base model.

Experts are set deterministically (seeded LoRA factors), as in the serving tests; the
router's signatures are computed from the demo data. The figures go to
``benchmarks/results/serving.json`` (``publish``; ``--quick``: a temp dir); its text is
``benchmarks/templates/serving``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

import torch

from benchmarks.common import parser, setup_torch
from benchmarks.report import publish
from fedmoe.aggregate import merge_cat
from fedmoe.config import LoraSettings
from fedmoe.data import parse_record
from fedmoe.demo_data import DOMAINS, generate_domain
from fedmoe.featurizer import FeaturizerSettings, request_text
from fedmoe.modeling import BaseModel, initial_adapter, load_base_model
from fedmoe.routing import Router
from fedmoe.serve.engine import Engine, Finished, GenerationJob, Sampling
from fedmoe.serve.models import ModelRegistry
from fedmoe.serve.router import BaseView
from fedmoe.signature import compute_signature

ANSWER_TOKENS = 64


def build(base: BaseModel) -> ModelRegistry:
    """Three seeded experts and their ``cat`` gateway on the base model."""
    lora = LoraSettings()
    start = initial_adapter(base, lora)
    states = []
    for seed, name in enumerate(DOMAINS, start=1):
        generator = torch.Generator().manual_seed(seed)
        state = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
        states.append((name, state))
    registry = ModelRegistry(base)
    for name, state in states:
        registry.install(name, lora.to_peft(), state, version=1)
    gateway = merge_cat([s for _, s in states], [1 / 3] * 3)
    rank = lora.rank * 3
    registry.install("gateway", lora.to_peft(rank=rank, alpha=lora.alpha * 3), gateway, version=3)
    return registry


def run_batch(engine: Engine, prompts: list[list[int]], adapters: list[str]) -> tuple[float, int]:
    """Submit the requests together; wall seconds until all finished, and tokens generated."""
    done = threading.Semaphore(0)
    finished: list[Finished] = []

    def emit(event: Any) -> None:
        if isinstance(event, Finished):
            finished.append(event)
            done.release()

    sampling = Sampling(max_tokens=ANSWER_TOKENS, temperature=0.0)
    started = time.perf_counter()
    for ids, adapter in zip(prompts, adapters):
        engine.submit(GenerationJob(ids, adapter, sampling, emit))
    for _ in prompts:
        done.acquire()
    seconds = time.perf_counter() - started
    assert {f.batch_size for f in finished} == {len(prompts)}, "requests were not batched"
    return seconds, sum(f.completion_tokens for f in finished)


ARMS = {
    "one adapter, 1 request": ["python_expert"],
    "one adapter, batch of 3": ["python_expert"] * 3,
    "three adapters mixed, batch of 3": list(DOMAINS),
    "merged gateway, 1 request": ["gateway"],
    "merged gateway, batch of 3": ["gateway"] * 3,
    "base model (no adapter), batch of 3": ["__base__"] * 3,
}


def throughput(engine: Engine, prompt: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """Tokens/s of every arm, arms interleaved so that machine load hits all alike."""
    totals = {arm: [0.0, 0] for arm in ARMS}
    for _ in range(repeats):
        for arm, adapters in ARMS.items():
            seconds, tokens = run_batch(engine, [prompt] * len(adapters), adapters)
            totals[arm][0] += seconds
            totals[arm][1] += tokens
    return {
        arm: {"seconds": s, "tokens": t, "tokens_per_s": t / s} for arm, (s, t) in totals.items()
    }


def router_latency(registry: ModelRegistry, repeats: int) -> dict[str, Any]:
    """Per-request routing time (featurize + score), p50 / p99 in ms, and accuracy."""
    base, peft_model = registry.base, registry.require_model()
    settings = FeaturizerSettings()
    signatures = {}
    for domain in DOMAINS:
        examples = [parse_record(r) for r in generate_domain(domain, 100, seed=1)]
        signatures[domain] = compute_signature(  # adapters disabled, as a worker computes it
            peft_model, base.tokenizer, examples, settings, base.fingerprint
        )
    router = Router(signatures)
    model, held_out = BaseView(registry.require_model()), []
    for domain in DOMAINS:
        records = generate_domain(domain, repeats, seed=7)
        held_out += [(domain, request_text(parse_record(r), base.tokenizer)) for r in records]
    times, correct = [], 0
    for domain, text in held_out:
        started = time.perf_counter()
        decision = router.route_texts(model, base.tokenizer, [text])[0]
        times.append((time.perf_counter() - started) * 1000)
        correct += decision.expert == domain
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
        "requests": len(times),
        "accuracy": correct / len(held_out),
    }


def main() -> None:
    """Run the measurements and publish them (``benchmarks/results/serving.json``)."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_torch()
    repeats = 2 if args.quick else 5
    base = load_base_model(args.base_model, device="cpu")
    registry = build(base)
    engine = Engine(registry.require_model, base.tokenizer, batch_wait=0.005)
    try:
        prompt = base.tokenizer("SELECT name, total FROM orders WHERE")["input_ids"]
        answer_times = [run_batch(engine, [prompt], ["sql_expert"])[0] for _ in range(repeats)]
        router = router_latency(registry, 10 if args.quick else 40)
        arms = throughput(engine, prompt, repeats)
    finally:
        engine.close()
    answer_ms = statistics.median(answer_times) * 1000
    values = {
        "load_average": list(os.getloadavg()),
        "base_model": args.base_model,
        "quick": args.quick,
        "answer_tokens": ANSWER_TOKENS,
        "answer_64_tokens_ms": answer_ms,
        "router": {**router, "share_of_answer": router["p50_ms"] / answer_ms},
        "generation": arms,
    }
    publish("serving", "Serving: router latency and generation tokens/s", values, args)


if __name__ == "__main__":
    main()
