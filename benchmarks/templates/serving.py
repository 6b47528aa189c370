"""``serving``: ``fedmoe serve``'s engine, router latency and generation tokens/s."""

from __future__ import annotations

from typing import Any

from benchmarks.templates import loads, markdown_table


def render(v: dict[str, Any]) -> str:
    """The section body."""
    router, single = v["router"], v["generation"]["one adapter, 1 request"]["tokens_per_s"]
    rows = [
        [arm, f"{x['tokens_per_s']:.0f}", f"{x['tokens_per_s'] / single:.2f}×"]
        for arm, x in v["generation"].items()
    ]
    return f"""
CPU, 1 torch thread, on a machine shared with other jobs (load {loads(v["load_average"])}); base `{v["base_model"]}`, greedy, {v["answer_tokens"]}-token answers.

Router (featurize a 32-token prefix + score, per request): p50 {router["p50_ms"]:.1f} ms, p99 {router["p99_ms"]:.1f} ms over {router["requests"]} held-out demo prompts ({router["accuracy"]:.0%} routed to their domain's expert); a {v["answer_tokens"]}-token answer takes {v["answer_64_tokens_ms"]:.0f} ms, so routing is {router["share_of_answer"]:.1%} of it.

{markdown_table(["generation", "tokens/s", "vs one request"], rows)}
"""
