"""``routing``: the routed gateway against experts, merges, Arrow and a centralised LoRA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.templates import fmt, loads, markdown_table


def mean(values: dict[str, float] | Sequence[float]) -> float:
    """The mean of a dict's values or a sequence."""
    items = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(items) / len(items)


def render(r: dict[str, Any]) -> str:
    """The section body."""
    table, s = r["losses"], r["settings"]
    domains = list(table["base"])  # the demo's domains, in the order measured
    rows = [[name, *(fmt(v[d]) for d in domains), fmt(mean(v))] for name, v in table.items()]
    own, routed = table["own expert (oracle)"], table["gateway: routed (default)"]
    ratios = {d: routed[d] / own[d] for d in domains}
    conf = [[d, *(row[c] for c in [*domains, "fallback"])] for d, row in r["confusion"].items()]
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
        [
            d,
            f"{100 * v['fallback_share']:.0f}%",
            fmt(v["routed_loss"]),
            fmt(v["cat_loss"]),
            "-" if v.get("ood_median") is None else f"{v['ood_median']:.1f}",
        ]
        for d, v in r["leave_one_out"].items()
    ]
    rules = [
        [
            x["margin"],
            x["max_distance"],
            x["fallback"],
            x.get("ood_factor", 0.0),
            f"{100 * x.get('accuracy', float('nan')):.1f}%",
            fmt(x["routed_mean"]),
            fmt(x["loo_mean"]),
            fmt(x["loo_cat_mean"]),
            f"{100 * x['loo_fallback_share']:.0f}%",
        ]
        for x in r["rules"]
    ]
    stats = [
        [
            x["statistic"],
            x["factor"],
            f"{100 * x['accuracy']:.1f}%",
            *(f"{100 * x['loo_fallback'][d]:.0f}%" for d in domains),
        ]
        for x in r.get("statistics", [])
    ]
    sizes = [
        [
            x["examples"],
            f"{100 * x['accuracy']:.1f}%",
            *(f"{100 * x['loo_fallback'][d]:.0f}%" for d in domains),
        ]
        for x in r.get("signature_size", [])
    ]
    lat = r["latency"]
    diag = [
        mean(x["loo_fallback"])
        for x in r.get("statistics", [])
        if x["statistic"] == "diagonal" and x["accuracy"] >= 0.99
    ]
    diag_best = f"{100 * max(diag):.0f}%" if diag else "none"
    good = [
        x["factor"]
        for x in r.get("statistics", [])
        if x["statistic"] == "subspace"
        and x["accuracy"] >= 0.99
        and min(x["loo_fallback"].values()) >= 0.95
    ]
    sub_range = f"{min(good)}–{max(good)}" if good else "none"
    central = mean(table["centralised LoRA (pooled, 3x tokens)"])
    below = "below" if mean(routed) < central else "NOT below"
    met = "met" if max(ratios.values()) <= 1.03 else "NOT met"
    rule_head = [
        "margin",
        "max distance",
        "fallback",
        "ood factor",
        "accuracy",
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

{markdown_table(["model", *domains, "mean"], rows)}

Routed / own expert: {", ".join(f"{d} {v:.3f}" for d, v in ratios.items())} (goal ≤ 1.03 on
every domain: {met}). Routed mean {mean(routed):.3f} vs centralised LoRA {central:.3f}
({below}).

**Routing accuracy** at the default featurizer: {100 * r["accuracy"]:.1f}% of held-out requests
(goal ≥ 95%). Confusion (rows: true domain; columns: where the router sent it):

{markdown_table(["domain", *domains, "fallback"], conf)}

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
fallback should catch them and be no worse than `cat` of the remaining experts; "median ood"
is the subspace distance to the top remaining expert over that expert's threshold, > 1 falls
back):

{markdown_table(["left out", "fell back", "routed loss", "cat loss", "median ood"], loo)}

**Which statistic tells a missing domain apart.** Each expert's threshold is factor × the
99th percentile of the statistic over its own training features (what a worker measures on
its data and sends; for the subspace it is in the signature); margin 0, no other bound.
Accuracy counts a fallback as a miss; LOO is the share of a left-out domain's held-out
prompts that fall back:

{markdown_table(["statistic", "factor", "accuracy", *(f"LOO {d}" for d in domains)], stats)}

**Decision rule** (ood factor 0 is the rule before out-of-domain detection; accuracy and
routed mean loss in-domain, then leave-one-out routed vs `cat`, mean over the left-out domains):

{markdown_table(rule_head, rules)}

**Signature size** (the default rule with signatures over the first n training examples of
each domain; the coordinator refuses fewer than {s.get("min_count", 100)}):

{markdown_table(["examples", "accuracy", *(f"LOO {d}" for d in domains)], sizes)}

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
{s["router"]["max_distance"]}: the tightest diagonal bound that loses no in-domain request here.
Out-of-domain factor {s["router"].get("ood_factor", 0)} (subspace of rank
{s.get("signature_rank", "-")}): the diagonal distance cannot tell a missing domain apart
(at the factors that keep in-domain accuracy ≥ 99% it catches at most {diag_best} of the
left-out prompts, averaged over the three: the docs domain's broad diagonal Gaussian holds
the python prompts as closely as its own), nor the margin (0.5 costs in-domain accuracy
and catches no more left-out prompts than 0.1: the decision rule table); a `mix` fallback
leans on the wrong expert. The subspace distance keeps in-domain accuracy ≥ 99% and catches
≥ 95% of every left-out domain at factors {sub_range}; the default sits inside that range
with room on both sides, so the missing domain is served at `cat`'s loss. It needs enough
examples per signature to fit 16 directions: with 30 it is overfit and sends in-domain
requests to the fallback too (the signature size table); the coordinator's minimum of 100
is above where that stops.
Signature noise must stay well below the per-dimension spread of the features (about
1/hidden): σ = 1e-4 is harmless on `tiny` (hidden 64), 1e-3 is not.

Load average (1, 5, 15 min) before
{loads(r["load_before"])}, after {loads(r["load_after"])}; wall time {r["wall_seconds"]:.0f} s.
"""
