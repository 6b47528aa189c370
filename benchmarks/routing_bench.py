"""Routing: the routed gateway vs experts and merges at equal token budgets, and the router.

Run: ``.venv/bin/python -m benchmarks.routing_bench [--quick] [--write]``.

One process, real library pieces: ``LocalTrainer`` trains one expert per demo domain (one
worker per expert: plain local training, the demo's layout) and a centralised LoRA on the
pooled data with 3x the tokens; ``GatewayMerge`` builds the merges; ``fedmoe.signature`` and
``fedmoe.routing.Router`` route every held-out example by what its request carries. Trained
adapters are cached (safetensors) in a temp dir, so a rerun only evaluates. Writes
``benchmarks/routing.json`` and the ``routing`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import ArrowConfig, PeftModel, create_arrow_model
from safetensors.torch import load_file, save_file

from benchmarks.common import fmt, load_average, mean, parser, setup_torch
from benchmarks.report import markdown_table, publish
from benchmarks.simulation import Workbench
from fedmoe.adapters import write_peft_dir
from fedmoe.aggregate import AdapterState
from fedmoe.batching import TokenizedExample, count_trainable_tokens, tokenize_example
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import Example, load_examples
from fedmoe.demo_data import DOMAINS, write_demo_datasets
from fedmoe.evaluation import validation_loss
from fedmoe.modeling import attach_lora, load_adapter_state, load_base_model
from fedmoe.routing import DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE, Router
from fedmoe.signature import DomainSignature, FeaturizerSettings, featurize, request_text
from fedmoe.strategy import MERGE_METHODS, GatewayMerge

JSON_PATH = Path(__file__).resolve().parent / "routing.json"
CACHE = Path(tempfile.gettempdir()) / "fedmoe-routing-bench"
PREFIXES = (8, 16, 32, 64)
LAYERS = (0, 1, -1)


@dataclass
class Split:
    """One domain's examples (raw, for routing) and their tokenisation (for losses)."""

    train: list[Example]
    validation: list[Example]
    train_tokens: list[TokenizedExample]
    validation_tokens: list[TokenizedExample]


def load_domains(tokenizer: Any, train_count: int, validation_count: int) -> dict[str, Split]:
    """The demo's generated domains, kept aligned: raw example i ↔ tokenized example i."""
    paths = write_demo_datasets(
        Path(tempfile.mkdtemp(prefix="fedmoe-routing-data-")),
        train_count=train_count,
        validation_count=validation_count,
    )
    result = {}
    for name, (train_path, valid_path) in paths.items():
        train, valid = load_examples(train_path), load_examples(valid_path)

        def tok(examples: list[Example]) -> list[TokenizedExample]:
            return [tokenize_example(e, tokenizer, max_length=256) for e in examples]

        result[name] = Split(train, valid, tok(train), tok(valid))
    return result


# --- training (cached) -----------------------------------------------------------------------


def trained(
    bench: Workbench, key: str, examples: list[TokenizedExample], steps: int
) -> AdapterState:
    """``steps`` LocalTrainer steps on ``examples`` from the shared initial adapter (cached)."""
    path = CACHE / f"{key}-{steps}.safetensors"
    if path.exists():
        return load_file(str(path))
    worker = bench.worker(key, key, examples)
    for _ in range(steps):
        bench.step(worker)
    state = bench.state_of(worker)
    bench.occupant = None
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


# --- evaluation ------------------------------------------------------------------------------


class Losses:
    """Token-weighted validation loss of adapters on any subset of examples."""

    def __init__(self, base_model: str, lora: LoraSettings, pad: int) -> None:
        self.base_model, self.lora, self.pad = base_model, lora, pad
        self.models: dict[tuple[int, float], Any] = {}
        self.base = load_base_model(base_model, device="cpu").model

    def total(
        self, state: AdapterState | None, examples: Sequence[TokenizedExample], rank: int = 0
    ) -> tuple[float, int]:
        """(summed loss, target tokens) of ``state`` (None: the base) on ``examples``."""
        if not examples:
            return 0.0, 0
        model = self.base if state is None else self._model(state, rank or self.lora.rank)
        tokens = count_trainable_tokens(list(examples))
        loss = validation_loss(model, list(examples), pad_token_id=self.pad)
        return loss * tokens, tokens

    def _model(self, state: AdapterState, rank: int) -> Any:
        key = (rank, self.lora.alpha * rank / self.lora.rank)
        if key not in self.models:
            settings = LoraSettings(
                rank=key[0], alpha=key[1], target_modules=self.lora.target_modules
            )
            self.models[key] = attach_lora(
                load_base_model(self.base_model, device="cpu").model, settings
            )
        load_adapter_state(self.models[key], state)
        return self.models[key]

    def loss(
        self, state: AdapterState | None, examples: Sequence[TokenizedExample], rank: int = 0
    ) -> float:
        """Mean loss per target token."""
        total, tokens = self.total(state, examples, rank)
        return total / max(tokens, 1)


def merged(lora: LoraSettings, states: list[AdapterState], method: str, weights=None):  # type: ignore[no-untyped-def]
    """(state, rank) of a ``GatewayMerge`` of ``states``."""
    merger = GatewayMerge(method=method, lora=lora)
    rank, _ = merger.gateway_rank_alpha(len(states))
    return merger.merge(states, weights or [1.0] * len(states)), rank


def routed_loss(
    losses: Losses,
    lora: LoraSettings,
    router: Router,
    experts: dict[str, AdapterState],
    features: torch.Tensor,
    examples: list[TokenizedExample],
) -> tuple[float, dict[str, int]]:
    """Loss when each example is answered as the router decides; and where they went."""
    groups: dict[str, list[int]] = {}
    mixes: dict[str, dict[str, float]] = {}
    for index, decision in enumerate(router.route_batch(features)):
        label = decision.expert or (
            "merged" if decision.fallback == "merged" else json.dumps(decision.weights)
        )
        groups.setdefault(label, []).append(index)
        if decision.fallback == "mix":
            mixes[label] = decision.weights
    total = tokens = 0.0
    for label, indices in groups.items():
        subset = [examples[i] for i in indices]
        if label in experts:
            state, rank = experts[label], lora.rank
        elif label == "merged":
            state, rank = merged(lora, list(experts.values()), "cat")
        else:
            names = list(mixes[label])
            state, rank = merged(
                lora, [experts[n] for n in names], "cat", list(mixes[label].values())
            )
        part, count = losses.total(state, subset, rank)
        total, tokens = total + part, tokens + count
    where = {
        label if label in experts or label == "merged" else "mix": len(ix)
        for label, ix in groups.items()
    }
    return total / max(tokens, 1), where


def arrow_losses(
    base_model: str, lora: LoraSettings, experts: dict[str, AdapterState], domains: dict[str, Split]
) -> dict[int, dict[str, float]]:
    """peft's data-free Arrow router (per token) over the experts, top_k 1..3."""
    scratch = Path(tempfile.mkdtemp(prefix="fedmoe-arrow-"))
    paths = [
        str(write_peft_dir(state, lora, scratch / name, base_model=base_model))
        for name, state in experts.items()
    ]
    result = {}
    base = load_base_model(base_model, device="cpu")
    for top_k in (1, 2, 3):
        model = create_arrow_model(
            load_base_model(base_model, device="cpu").model,
            paths,
            ArrowConfig(top_k=top_k, router_temperature=1.0),
        )
        result[top_k] = {
            d: validation_loss(model, s.validation_tokens, pad_token_id=base.tokenizer.pad_token_id)
            for d, s in domains.items()
        }
    return result


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
        cat_state, rank = merged(lora, list(rest.values()), "cat")
        result[domain] = {
            "fallback_share": sum(d.expert is None for d in decisions) / len(decisions),
            "routed_loss": loss,
            "cat_loss": losses.loss(cat_state, domains[domain].validation_tokens, rank),
            "where": where,
        }
    return result


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
    for margin in (0.0, DEFAULT_MARGIN, 0.5):
        for distance in [*sorted({DEFAULT_MAX_DISTANCE, 4.0}), None]:
            for fallback in ("merged", "mix"):
                router = Router(signatures, margin=margin, max_distance=distance, fallback=fallback)
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
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--render", action="store_true", help="Rewrite RESULTS.md from the JSON.")
    args = cli.parse_args()
    if args.render:
        results = json.loads(JSON_PATH.read_text())
        publish(
            "routing", "Routing: the routed gateway and the router", render(results), write=True
        )
        return
    setup_torch()
    started, load_before = time.monotonic(), load_average()
    steps = 40 if args.quick else 300
    lora, train = LoraSettings(), TrainSettings()
    bench = Workbench(args.base_model, lora, train)
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

    signatures = signatures_for(model, tokenizer, domains, FeaturizerSettings(), fp)
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
        "noise": noise_accuracy(model, tokenizer, domains, fp, features),
        "latency": latency(router, model, tokenizer, prompts, expert_model),
        "load_before": load_before,
        "load_after": load_average(),
        "wall_seconds": time.monotonic() - started,
    }
    if args.write or not args.quick:
        JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")
    publish(
        "routing",
        "Routing: the routed gateway and the router",
        render(results),
        write=args.write or not args.quick,
    )


def render(r: dict[str, Any]) -> str:
    """The RESULTS.md section from the JSON results."""
    table, s = r["losses"], r["settings"]
    rows = [[name, *(fmt(v[d]) for d in DOMAINS), fmt(mean(v))] for name, v in table.items()]
    own, routed = table["own expert (oracle)"], table["gateway: routed (default)"]
    ratios = {d: routed[d] / own[d] for d in DOMAINS}
    conf = [[d, *(row[c] for c in [*DOMAINS, "fallback"])] for d, row in r["confusion"].items()]
    sweep_rows = [
        [
            x["layer"],
            x["prefix_tokens"],
            x["method"],
            f"{100 * x['accuracy_argmax']:.1f}%",
            f"{100 * x['accuracy_default_rule']:.1f}%",
        ]
        for x in r["sweep"]
    ]
    loo = [
        [d, f"{100 * v['fallback_share']:.0f}%", fmt(v["routed_loss"]), fmt(v["cat_loss"])]
        for d, v in r["leave_one_out"].items()
    ]
    rules = [
        [
            x["margin"],
            x["max_distance"],
            x["fallback"],
            fmt(x["routed_mean"]),
            fmt(x["loo_mean"]),
            fmt(x["loo_cat_mean"]),
            f"{100 * x['loo_fallback_share']:.0f}%",
        ]
        for x in r["rules"]
    ]
    lat = r["latency"]
    central = mean(table["centralised LoRA (pooled, 3x tokens)"])
    below = "below" if mean(routed) < central else "NOT below"
    met = "met" if max(ratios.values()) <= 1.03 else "NOT met"
    rule_head = [
        "margin",
        "max distance",
        "fallback",
        "routed",
        "LOO routed",
        "LOO cat",
        "fell back",
    ]
    return f"""
**Method.** One process, real library pieces: `LocalTrainer` trains one expert per demo domain
for {s["steps_per_expert"]} steps each (one worker per expert, the demo's layout, so FedMoE is
plain local training) and a centralised LoRA for 3x the steps on the pooled data (equal tokens
per domain); `GatewayMerge` builds the merges (uniform); peft's `create_arrow_model` is the
data-free per-token Arrow router over the same experts. Routing uses `fedmoe.signature` /
`fedmoe.routing.Router` exactly as the CLI does: signatures from each domain's 400 training
examples, featurizer {s["featurizer"]}, router {s["router"]}; every held-out example is
routed by what its request carries (its prompt, or the start of a `text` record) and its loss
is taken under the adapter chosen (on fallback: the `cat` gateway, or a weighted `cat` mix of
the top 2). {s["validation_per_domain"]} held-out examples per domain; `{s["base_model"]}` base.

Validation loss (nats per target token, lower is better):

{markdown_table(["model", *DOMAINS, "mean"], rows)}

Routed / own expert: {", ".join(f"{d} {v:.3f}" for d, v in ratios.items())} (goal ≤ 1.03 on
every domain: {met}). Routed mean {mean(routed):.3f} vs centralised LoRA {central:.3f}
({below}).

**Routing accuracy** at the default featurizer: {100 * r["accuracy"]:.1f}% of held-out requests
(goal ≥ 95%). Confusion (rows: true domain; columns: where the router sent it):

{markdown_table(["domain", *DOMAINS, "fallback"], conf)}

Layer × prefix length × scoring (argmax: no margin, no distance bound; default rule: margin
{s["router"]["margin"]}, max distance {s["router"]["max_distance"]}, fallback counted as a miss):

{markdown_table(["layer", "P", "method", "argmax", "default rule"], sweep_rows)}

Records routed by the start of their full text (no prompt split):
{", ".join(f"{d} {100 * v:.0f}%" for d, v in r["text_only"].items())}. Prompts mixing two
domains (A's prompt, then B's; 60 pairs): routed to A {r["mixed"]["first"]}, to B
{r["mixed"]["second"]}, elsewhere {r["mixed"]["other"]}, fallback {r["mixed"]["fallback"]}
(the router reads the first P tokens, so the domain that opens the request decides). Signature noise
(`--signature-noise`, std per coordinate): accuracy
{", ".join(f"σ={k} {100 * v:.1f}%" for k, v in r["noise"].items())}.

**Leave one expert out** (that domain's requests with only the other two experts; the
fallback should catch them and be no worse than `cat` of the remaining experts):

{markdown_table(["left out", "fell back", "routed loss", "cat loss"], loo)}

**Decision rule** (mean loss; in-domain routed, and leave-one-out routed vs `cat`):

{markdown_table(rule_head, rules)}

**Router latency** (featurize the first P tokens with the base model + score, one request,
CPU, 1 thread): p50 {lat["router_p50_ms"]:.1f} ms, p99 {lat["router_p99_ms"]:.1f} ms; a 64-token
greedy answer with one expert {lat["answer_64_ms"]:.0f} ms, so the router is
{100 * lat["share_p50"]:.1f}% of it (goal ≤ 5%).

**Defaults chosen from this.** Scoring `gaussian` (mean per-dimension log-likelihood under
each expert's diagonal Gaussian): 100% at every layer and prefix length, where centred cosine
dips to 94–96%. Layer -1 (the last hidden state; cosine is best there) and P = 32: every P
routes 100% with `gaussian` on these generated prompts; 32 is kept because real requests share
longer openings (a system prompt, a chat template) than these, and it costs
{lat["router_p50_ms"]:.0f} ms. Margin
{s["router"]["margin"]}: a larger one (0.5) sends correctly routed requests to the fallback
(worse in-domain). Fallback `merged`: with an expert left out, `mix` puts nearly all weight on
the wrong top expert, while `cat` is what the unknown domain is best served by. Max distance
{s["router"]["max_distance"]}: the tightest bound that loses no in-domain request here; it
catches the most left-out requests, and only the docs domain's (the others are confidently
sent to the nearest remaining expert): leave-one-out remains the router's weak case.
Signature noise must stay well below the per-dimension spread of the features (about
1/hidden): σ = 1e-4 is harmless on `tiny` (hidden 64), 1e-3 is not.

Figures taken on a loaded shared machine (2 cores, 6 engineers): load average before
{r["load_before"]}, after {r["load_after"]}; wall time {r["wall_seconds"]:.0f} s.
"""


if __name__ == "__main__":
    main()
