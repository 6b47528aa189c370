"""Routing: the routed gateway vs experts and merges at equal token budgets, and the router.

Run: ``.venv/bin/python -m benchmarks.routing_bench [--quick] [--results-dir DIR]``.

One process, real library pieces: ``LocalTrainer`` trains one expert per demo domain (one
worker per expert: plain local training, the demo's layout) and a centralised LoRA on the
pooled data with 3x the tokens; ``GatewayMerge`` builds the merges; ``fedmoe.signature`` and
``fedmoe.routing.Router`` route every held-out example by what its request carries. Trained
adapters are cached (safetensors) in a temp dir, so a rerun only evaluates. Writes
``benchmarks/results/routing.json`` (``publish``); its text is ``benchmarks/templates/routing``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from benchmarks._routing_losses import (
    Losses,
    Split,
    arrow_losses,
    load_domains,
    merged,
    routed_loss,
    trained,
)
from benchmarks._routing_ood import by_signature_size, statistic_comparison
from benchmarks.common import mean, parser, start
from benchmarks.report import publish
from benchmarks.simulation import Workbench
from fedmoe.adapters import write_peft_dir
from fedmoe.aggregate import AdapterState
from fedmoe.config import LoraSettings
from fedmoe.demo_data import DOMAINS
from fedmoe.featurizer import FeaturizerSettings, featurize, request_text
from fedmoe.modeling import load_base_model
from fedmoe.ood import DEFAULT_RANK
from fedmoe.routing import DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, DEFAULT_OOD_FACTOR, Router
from fedmoe.signature import DomainSignature
from fedmoe.strategy import MERGE_METHODS

PREFIXES = (8, 16, 32, 64)
LAYERS = (0, 1, -1)


# --- routing measurements --------------------------------------------------------------------


def signatures_for(
    model: Any, tokenizer: Any, domains: dict[str, Split], settings: FeaturizerSettings, fp: str
) -> dict[str, DomainSignature]:
    """Each domain's signature from its training examples (what the workers send)."""
    return {
        d: DomainSignature.from_features(
            featurize(model, tokenizer, [request_text(e, tokenizer) for e in s.train], settings),
            settings,
            fp,
        )
        for d, s in domains.items()
    }


def validation_features(
    model: Any, tokenizer: Any, domains: dict[str, Split], settings: FeaturizerSettings
) -> dict[str, torch.Tensor]:
    """Features of every held-out example's request text."""
    return {
        d: featurize(model, tokenizer, [request_text(e, tokenizer) for e in s.validation], settings)
        for d, s in domains.items()
    }


def accuracy(router: Router, features: dict[str, torch.Tensor]) -> float:
    """Share of held-out requests routed to their own domain's expert."""
    hits = sum(sum(x.expert == d for x in router.route_batch(f)) for d, f in features.items())
    return hits / sum(len(f) for f in features.values())


def sweep(model: Any, tokenizer: Any, domains: dict[str, Split], fp: str) -> list[dict[str, Any]]:
    """Routing accuracy for every (layer, P, method), margin 0 (no fallback)."""
    rows = []
    for layer in LAYERS:
        for prefix in PREFIXES:
            settings = FeaturizerSettings(layer=layer, prefix_tokens=prefix)
            sigs = signatures_for(model, tokenizer, domains, settings, fp)
            feats = validation_features(model, tokenizer, domains, settings)
            for method in ("cosine", "gaussian"):
                strict = Router(sigs, method=method)
                loose = Router(sigs, method=method, margin=0.0, max_distance=None)
                rows.append(
                    {
                        "layer": layer,
                        "prefix_tokens": prefix,
                        "method": method,
                        "accuracy_argmax": accuracy(loose, feats),
                        "accuracy_default_rule": accuracy(strict, feats),
                    }
                )
    return rows


def confusion(router: Router, features: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Rows: true domain; columns: expert chosen or ``fallback``."""
    table = {}
    for domain, feats in features.items():
        row = {name: 0 for name in router.names} | {"fallback": 0}
        for decision in router.route_batch(feats):
            row[decision.expert or "fallback"] += 1
        table[domain] = row
    return table


def text_only_accuracy(
    router: Router, model: Any, tokenizer: Any, domains: dict[str, Split]
) -> dict[str, float]:
    """Records without a prompt: route every held-out record by the start of its full text."""
    result = {}
    for domain, split in domains.items():
        texts = ["".join(t for t, _ in seg) for seg in (e.segments for e in split.validation)]
        texts = [t if t else request_text(e, tokenizer) for t, e in zip(texts, split.validation)]
        decisions = router.route_texts(model, tokenizer, texts)
        result[domain] = sum(x.expert == domain for x in decisions) / len(decisions)
    return result


def mixed_prompts(
    router: Router, model: Any, tokenizer: Any, domains: dict[str, Split]
) -> dict[str, Any]:
    """A request opening with domain A's prompt and continuing with domain B's: where to?"""
    counts = {"first": 0, "second": 0, "other": 0, "fallback": 0}
    for a in DOMAINS:
        for b in DOMAINS:
            if a == b:
                continue
            for ea, eb in zip(domains[a].validation[:10], domains[b].validation[:10]):
                text = request_text(ea, tokenizer) + "\n" + request_text(eb, tokenizer)
                decision = router.route_texts(model, tokenizer, [text])[0]
                if decision.expert is None:
                    counts["fallback"] += 1
                else:
                    counts[
                        "first"
                        if decision.expert == a
                        else "second"
                        if decision.expert == b
                        else "other"
                    ] += 1
    return counts


def latency(
    router: Router, model: Any, tokenizer: Any, prompts: list[str], expert_model: Any
) -> dict[str, float]:
    """Router (featurize + route, one request) p50/p99 vs a 64-token greedy answer."""
    for prompt in prompts[:5]:
        router.route_texts(model, tokenizer, [prompt])
    seconds = []
    for prompt in prompts:
        began = time.perf_counter()
        router.route_texts(model, tokenizer, [prompt])
        seconds.append(time.perf_counter() - began)
    answers = []
    for prompt in prompts[:5]:
        began = time.perf_counter()
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            expert_model.generate(
                **inputs, min_new_tokens=64, max_new_tokens=64, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        answers.append(time.perf_counter() - began)
    seconds.sort()
    p50 = statistics.median(seconds)
    p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
    answer = statistics.median(answers)
    return {
        "router_p50_ms": 1e3 * p50,
        "router_p99_ms": 1e3 * p99,
        "answer_64_ms": 1e3 * answer,
        "share_p50": p50 / answer,
    }


def leave_one_out(
    losses: Losses,
    lora: LoraSettings,
    router: Router,
    experts: dict[str, AdapterState],
    features: dict[str, torch.Tensor],
    domains: dict[str, Split],
) -> dict[str, dict[str, Any]]:
    """Each domain's expert removed: its prompts should fall back, no worse than ``cat``."""
    result = {}
    for domain in DOMAINS:
        rest = {n: s for n, s in experts.items() if n != domain}
        without = router.without(domain)
        decisions = without.route_batch(features[domain])
        loss, where = routed_loss(
            losses, lora, without, rest, features[domain], domains[domain].validation_tokens
        )
        if domain not in CAT_LOSSES:
            cat_state, rank = merged(lora, list(rest.values()), "cat")
            CAT_LOSSES[domain] = losses.loss(cat_state, domains[domain].validation_tokens, rank)
        ratios = [d.ood for d in decisions if d.ood is not None]
        result[domain] = {
            "fallback_share": sum(d.expert is None for d in decisions) / len(decisions),
            "routed_loss": loss,
            "cat_loss": CAT_LOSSES[domain],
            "where": where,
            "ood_median": statistics.median(ratios) if ratios else None,
        }
    return result


CAT_LOSSES: dict[str, float] = {}  # cat of the other experts, per left-out domain
# (margin, max distance, fallback, ood factor): the old default, argmax, and around the new one
RULES: list[tuple[float, float | None, str, float]] = [
    (DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, "merged", 0.0),
    (DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, "mix", 0.0),
    (0.0, None, "merged", 0.0),
    (0.5, DEFAULT_MAX_DISTANCE, "merged", 0.0),
    *((DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, "merged", f) for f in (1.5, 2.0, 3.0, 5.0, 10.0)),
    (DEFAULT_MARGIN, None, "merged", DEFAULT_OOD_FACTOR),
    (DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, "mix", DEFAULT_OOD_FACTOR),
    (0.5, DEFAULT_MAX_DISTANCE, "merged", DEFAULT_OOD_FACTOR),
]


def rule_grid(
    losses: Losses,
    lora: LoraSettings,
    signatures: dict[str, DomainSignature],
    experts: dict[str, AdapterState],
    features: dict[str, torch.Tensor],
    domains: dict[str, Split],
) -> list[dict[str, Any]]:
    """Routed loss in-domain and with each expert left out, per decision rule."""
    rows = []
    for margin, distance, fallback, factor in RULES:
        router = Router(
            signatures, margin=margin, max_distance=distance, fallback=fallback, ood_factor=factor
        )
        own = {
            d: routed_loss(
                losses, lora, router, experts, features[d], domains[d].validation_tokens
            )[0]
            for d in DOMAINS
        }
        loo = leave_one_out(losses, lora, router, experts, features, domains)
        rows.append(
            {
                "margin": margin,
                "max_distance": distance,
                "fallback": fallback,
                "ood_factor": factor,
                "accuracy": accuracy(router, features),
                "routed_mean": mean(own),
                "loo_mean": mean([v["routed_loss"] for v in loo.values()]),
                "loo_cat_mean": mean([v["cat_loss"] for v in loo.values()]),
                "loo_fallback_share": mean([v["fallback_share"] for v in loo.values()]),
            }
        )
    return rows


def noise_accuracy(
    model: Any,
    tokenizer: Any,
    domains: dict[str, Split],
    fp: str,
    features: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Routing accuracy when workers add Gaussian noise (``--signature-noise``)."""
    settings = FeaturizerSettings()
    result = {}
    for noise in (0.0, 0.0001, 0.001, 0.01):
        sigs = {}
        for index, (d, s) in enumerate(domains.items()):
            feats = featurize(
                model, tokenizer, [request_text(e, tokenizer) for e in s.train], settings
            )
            sigs[d] = DomainSignature.from_features(
                feats, settings, fp, noise=noise, generator=torch.Generator().manual_seed(index)
            )
        result[str(noise)] = accuracy(Router(sigs), features)
    return result


def main() -> None:
    """Train (or load) the experts, evaluate every arm, measure the router, write results."""
    args, run = start(parser(__doc__.splitlines()[0]))
    steps = 40 if args.quick else 300
    bench = Workbench(args.base_model)
    lora = bench.lora
    domains = load_domains(bench.tokenizer, 400, 30 if args.quick else 60)
    experts = {
        d: trained(bench, f"{args.base_model}-{d}", domains[d].train_tokens, steps) for d in DOMAINS
    }
    pooled = [x for d in DOMAINS for x in domains[d].train_tokens]
    central = trained(bench, f"{args.base_model}-centralised", pooled, steps * len(DOMAINS))
    base = load_base_model(args.base_model, device="cpu")
    model, tokenizer, fp = base.model, base.tokenizer, base.fingerprint
    losses = Losses(args.base_model, lora, tokenizer.pad_token_id)
    valid = {d: domains[d].validation_tokens for d in DOMAINS}

    train_features = {
        d: featurize(
            model, tokenizer, [request_text(e, tokenizer) for e in s.train], FeaturizerSettings()
        )
        for d, s in domains.items()
    }
    signatures = {
        d: DomainSignature.from_features(f, FeaturizerSettings(), fp)
        for d, f in train_features.items()
    }
    features = validation_features(model, tokenizer, domains, FeaturizerSettings())
    router = Router(signatures)
    table: dict[str, dict[str, float]] = {"base": {d: losses.loss(None, valid[d]) for d in DOMAINS}}
    for name, state in experts.items():
        table[f"expert {name}"] = {d: losses.loss(state, valid[d]) for d in DOMAINS}
    table["own expert (oracle)"] = {d: table[f"expert {d}"][d] for d in DOMAINS}
    for fallback in ("merged", "mix"):
        r = Router(signatures, fallback=fallback)
        label = (
            "gateway: routed (default)"
            if fallback == router.fallback
            else f"gateway: routed, fallback {fallback}"
        )
        table[label] = {
            d: routed_loss(losses, lora, r, experts, features[d], valid[d])[0] for d in DOMAINS
        }
    for method in MERGE_METHODS:
        state, rank = merged(lora, list(experts.values()), method)
        table[f"gateway: {method}"] = {d: losses.loss(state, valid[d], rank) for d in DOMAINS}
    for top_k, row in arrow_losses(args.base_model, lora, experts, domains).items():
        table[f"peft Arrow, top_k {top_k}"] = row
    table["centralised LoRA (pooled, 3x tokens)"] = {
        d: losses.loss(central, valid[d]) for d in DOMAINS
    }

    expert_model = PeftModel.from_pretrained(
        load_base_model(args.base_model, device="cpu").model,
        str(
            write_peft_dir(
                experts["sql_expert"],
                lora,
                Path(tempfile.mkdtemp()) / "sql",
                base_model=args.base_model,
            )
        ),
    ).eval()
    prompts = [request_text(e, tokenizer) for d in DOMAINS for e in domains[d].validation][
        : 60 if args.quick else 180
    ]
    results = {
        "settings": {
            "base_model": args.base_model,
            "steps_per_expert": steps,
            "featurizer": FeaturizerSettings().to_dict(),
            "router": router.options(),
            "signature_rank": DEFAULT_RANK,
            "validation_per_domain": len(valid[DOMAINS[0]]),
        },
        "losses": table,
        "accuracy": accuracy(router, features),
        "confusion": confusion(router, features),
        "sweep": sweep(model, tokenizer, domains, fp),
        "text_only": text_only_accuracy(router, model, tokenizer, domains),
        "mixed": mixed_prompts(router, model, tokenizer, domains),
        "leave_one_out": leave_one_out(losses, lora, router, experts, features, domains),
        "rules": rule_grid(losses, lora, signatures, experts, features, domains),
        "statistics": statistic_comparison(router, train_features, features),
        "signature_size": by_signature_size(train_features, features, fp),
        "noise": noise_accuracy(model, tokenizer, domains, fp, features),
        "latency": latency(router, model, tokenizer, prompts, expert_model),
        "load_before": run.load,
        "load_after": list(os.getloadavg()),
        "wall_seconds": run.seconds(),
    }
    publish("routing", "Routing: the routed gateway and the router", results, args)


if __name__ == "__main__":
    main()
