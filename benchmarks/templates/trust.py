"""``trust``: DP-SGD's cost at ε ∈ {∞, 8, 4, 1}, and poisoning workers against strategies."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import Column, column_table, loads, markdown_table


def _privacy(privacy: dict[str, dict[str, Any]]) -> str:
    if "inf" not in privacy:
        return "(not run: `--only`)"
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


ATTACKS = {"scale": "×100", "flip": "sign flip", "backdoor": "backdoor", "stealth": "stealthy"}


def _reasons(robust: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"- {label}, `{worker}`: {reason}"
        for label, arm in robust.items()
        for worker, reason in sorted(arm.get("reasons", {}).items())
    ]
    return "\n".join(lines) or "(none)"


def _robustness(robust: dict[str, dict[str, Any]]) -> str:
    baseline = next(iter(robust.values()))["loss"]["clean"]
    attacks = [k for k in ATTACKS if k in next(iter(robust.values()))["loss"]]

    def attack(kind: str) -> Column:
        return (
            f"{ATTACKS[kind]} (× clean)",
            lambda item: (
                f"{item[1]['loss'][kind]:.3f} ({item[1]['loss'][kind] / item[1]['loss']['clean']:.2f}×)"
            ),
        )

    def joined(arm: dict[str, Any], key: str, kinds: tuple[str, ...], form: str) -> str:
        return " / ".join(format(arm[key][k], form) for k in kinds if k in arm[key])

    columns: list[Column] = [
        ("strategy", lambda item: item[0]),
        (
            "clean run (× first row's)",
            lambda item: (
                f"{item[1]['loss']['clean']:.3f} ({item[1]['loss']['clean'] / baseline:.3f}×)"
            ),
        ),
        *(attack(kind) for kind in attacks),
        (
            "backdoor / stealthy success",
            lambda item: joined(item[1], "backdoor_success", ("backdoor", "stealth"), ".0%"),
        ),
        (
            "trigger-string loss (clean / each attack)",
            lambda item: joined(item[1], "trigger_loss", ("clean", *attacks), ".2f"),
        ),
        (
            "verdicts",
            lambda item: (
                ", ".join(f"{w}: {v}" for w, v in sorted(item[1]["verdicts"].items())) or "none"
            ),
        ),
    ]
    return column_table(columns, robust.items())


def render(v: dict[str, Any]) -> str:
    """The section body."""
    quick = "A `--quick` smoke run, one seed" if v["quick"] else "One seed"
    return f"""
{quick}, {v["seconds"]:.0f} s in all, on a machine shared with other jobs (load {loads(v["load_before"])} before), so the step times are noisy.

**DP-SGD at equal steps** (the worker's own trainers on one SQL expert, {v["dp_train_examples"]} training examples, batch 4, {v["dp_steps"]} steps; DP batches are Poisson-sampled with the batch size as their mean, so the expected tokens are equal; δ = 1/n; σ derived from ε over these steps by Opacus). Held-out loss, nats per target token:

{_privacy(v["privacy"])}

**Poisoning workers** (real coordinator processes and real worker jobs over HTTP; per strategy, one SQL expert per attacker with 4 workers each: 3 honest, then one more: honest for the clean run, ×100, sign-flipped, trained on backdoored data (a trigger line answered with `DROP TABLE users;`, 4 steps at lr 0.05), or the stealthy backdoor (the same training on a half clean, half backdoored mix, its delta scaled to the median norm of the 3 honest uploads, which it is given). Held-out clean SQL loss of each expert, its ratio to the same strategy's clean run, and the share of held-out trigger prompts whose greedy continuation is the backdoor string (plain backdoor / stealthy backdoor):

{_robustness(v["robustness"])}

Reasons recorded in the ledger:

{_reasons(v["robustness"])}
"""
