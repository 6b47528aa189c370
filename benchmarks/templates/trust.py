"""``trust``: DP-SGD's cost at ε ∈ {∞, 8, 4, 1}, and poisoning workers against strategies."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table


def _privacy(privacy: dict[str, dict[str, Any]]) -> str:
    plain = privacy["inf"]
    rows = []
    for label, arm in privacy.items():
        spent = "n/a" if arm["spent_epsilon"] is None else f"{arm['spent_epsilon']:.2f}"
        rows.append(
            [
                "∞ (no DP)" if label == "inf" else label,
                f"{arm['noise_multiplier']:.3f}",
                spent,
                f"{arm['loss']:.3f}",
                f"{arm['loss'] / plain['loss']:.3f}",
                f"{arm['tokens']:,}",
                f"{arm['step_seconds'] * 1000:.0f}",
                f"{arm['step_seconds'] / plain['step_seconds']:.2f}",
            ]
        )
    headers = ["ε target", "σ", "ε spent", "loss", "× no DP", "tokens", "ms/step", "× no DP"]
    return markdown_table(headers, rows)


def _robustness(robust: dict[str, dict[str, Any]]) -> str:
    baseline = next(iter(robust.values()))["loss"]["clean"]
    rows = []
    for label, arm in robust.items():
        loss, clean = arm["loss"], arm["loss"]["clean"]
        rows.append(
            [
                label,
                f"{clean:.3f} ({clean / baseline:.3f}×)",
                *(f"{loss[k]:.3f} ({loss[k] / clean:.2f}×)" for k in ("scale", "flip", "backdoor")),
                f"{arm['backdoor_success']['backdoor']:.0%}",
                ", ".join(f"{w}: {v}" for w, v in sorted(arm["verdicts"].items())) or "none",
            ]
        )
    headers = [
        "strategy",
        "clean run (× default's)",
        "×100 (× clean)",
        "sign flip (× clean)",
        "backdoor (× clean)",
        "backdoor success",
        "verdicts",
    ]
    return markdown_table(headers, rows)


def render(v: dict[str, Any]) -> str:
    """The section body."""
    quick = "A `--quick` smoke run, one seed" if v["quick"] else "One seed"
    return f"""
{quick}, {v["seconds"]:.0f} s in all, on a machine shared with other jobs (load {loads(v["load_before"])} before), so the step times are noisy.

**DP-SGD at equal steps** (the worker's own trainers on one SQL expert, {v["dp_train_examples"]} training examples, batch 4, {v["dp_steps"]} steps; DP batches are Poisson-sampled with the batch size as their mean, so the expected tokens are equal; δ = 1/n; σ derived from ε over these steps by Opacus). Held-out loss, nats per target token:

{_privacy(v["privacy"])}

**Poisoning workers** (real coordinator processes and real worker jobs over HTTP; per strategy, four SQL experts with 4 workers each: 3 honest and one more, honest for the clean run, ×100, sign-flipped, or trained on backdoored data: a trigger line answered with `DROP TABLE users;`, with 4 steps at lr 0.05). Held-out clean SQL loss of each expert, its ratio to the same strategy's clean run, and the share of held-out trigger prompts whose greedy continuation is the backdoor string:

{_robustness(v["robustness"])}
"""
