"""The numbers: staleness functions, the update rule and gateway merges, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe import aggregate
from fedmoe.config import LoraSettings
from fedmoe.strategy import GatewayMerge, StalenessDecay

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def random_expert(seed: int, rank: int = 4, dim_in: int = 12, dim_out: int = 10) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        KEY_A: torch.randn(rank, dim_in, generator=generator),
        KEY_B: torch.randn(dim_out, rank, generator=generator),
    }


@pytest.mark.parametrize(
    ("kind", "a", "b", "tau", "expected"),
    [
        ("inverse", None, None, 0, 1.0),
        ("inverse", None, None, 1, 1 / 1.1),
        ("inverse", None, None, 5, 1 / 1.5),
        ("inverse", 0.5, None, 4, 1 / 3.0),
        ("constant", None, None, 100, 1.0),
        ("polynomial", 0.5, None, 3, 0.5),
        ("polynomial", 1.0, None, 9, 0.1),
        ("hinge", 10.0, 4, 4, 1.0),
        ("hinge", 10.0, 4, 6, 1 / 21),
        ("exponential", 0.1, None, 10, math.exp(-1.0)),
    ],
)
def test_staleness_functions_match_hand_computed_values(kind, a, b, tau, expected) -> None:
    assert StalenessDecay(kind=kind, a=a, b=b)(tau) == pytest.approx(expected, rel=1e-12)


def test_staleness_decay_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="staleness kind"):
        StalenessDecay(kind="linear")
    with pytest.raises(ValueError, match="parameter a"):
        StalenessDecay(kind="polynomial", a=-1.0)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        StalenessDecay()(-1)


def test_update_rule_adds_scaled_delta_and_leaves_input_alone() -> None:
    theta = {"w": torch.tensor([1.0, 2.0, 3.0])}
    delta = {"w": torch.tensor([10.0, -10.0, 0.5])}
    weight = 1.0 * StalenessDecay()(2)  # η = 1, s(2) = 1/1.2
    updated = aggregate.apply_update(theta, delta, weight)
    expected = torch.tensor([1 + 10 / 1.2, 2 - 10 / 1.2, 3 + 0.5 / 1.2])
    torch.testing.assert_close(updated["w"], expected)
    torch.testing.assert_close(theta["w"], torch.tensor([1.0, 2.0, 3.0]))


def test_global_norm() -> None:
    assert aggregate.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == 5.0


def test_normalize_weights() -> None:
    assert aggregate.normalize_weights([1, 1, 2]) == [0.25, 0.25, 0.5]
    with pytest.raises(ValueError):
        aggregate.normalize_weights([0, 0])
    with pytest.raises(ValueError):
        aggregate.normalize_weights([1, -1])


def test_cat_merge_is_exact_weighted_average_of_products() -> None:
    experts = [random_expert(seed) for seed in range(3)]
    weights = aggregate.normalize_weights([1.0, 2.0, 3.0])
    merged = aggregate.merge_cat(experts, weights)
    assert merged[KEY_A].shape == (12, 12) and merged[KEY_B].shape == (10, 12)
    target = sum(w * (e[KEY_B] @ e[KEY_A]) for w, e in zip(weights, experts))
    assert (merged[KEY_B] @ merged[KEY_A] - target).abs().max() < 1e-5


def test_linear_merge_is_not_the_average_of_products() -> None:
    experts = [random_expert(seed) for seed in range(3)]
    weights = [1 / 3] * 3
    merged = aggregate.merge_linear(experts, weights)
    torch.testing.assert_close(merged[KEY_A], sum(e[KEY_A] for e in experts) / 3)
    target = sum(w * (e[KEY_B] @ e[KEY_A]) for w, e in zip(weights, experts))
    assert (merged[KEY_B] @ merged[KEY_A] - target).abs().max() > 1e-2


def test_svd_merge_is_best_rank_r_fit() -> None:
    experts = [random_expert(seed) for seed in range(3)]
    weights = [1 / 3] * 3
    merged = aggregate.merge_svd(experts, weights, rank=4)
    assert merged[KEY_A].shape == (4, 12) and merged[KEY_B].shape == (10, 4)
    target = sum(w * (e[KEY_B] @ e[KEY_A]) for w, e in zip(weights, experts))
    sigma = torch.linalg.svdvals(target.double())
    error = torch.linalg.matrix_norm((merged[KEY_B] @ merged[KEY_A] - target).double())
    assert float(error) == pytest.approx(float(sigma[4:].norm()), rel=1e-4)
    exact = aggregate.merge_svd(experts, weights, rank=10)
    assert (exact[KEY_B] @ exact[KEY_A] - target).abs().max() < 1e-4


@pytest.mark.parametrize("rank", [2, 4])
def test_svd_merge_of_thin_factors_is_the_products_truncated_svd(rank: int) -> None:
    # 3 experts of rank 4 on a 40x30 layer: the 12 stacked factors go through QR
    experts = [random_expert(seed, dim_in=30, dim_out=40) for seed in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = aggregate.merge_svd(experts, weights, rank=rank)
    assert merged[KEY_A].shape == (rank, 30) and merged[KEY_B].shape == (40, rank)
    target = sum(w * (e[KEY_B].double() @ e[KEY_A].double()) for w, e in zip(weights, experts))
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    best = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
    product = merged[KEY_B].double() @ merged[KEY_A].double()
    assert (product - best).abs().max() < 1e-5 * float(sigma[0])


def test_gateway_merge_keeps_peft_scaling_for_cat() -> None:
    lora = LoraSettings(rank=4, alpha=8.0)
    cat = GatewayMerge(method="cat", lora=lora)
    rank, alpha = cat.gateway_rank_alpha(3)
    assert (rank, alpha) == (12, 24.0)
    assert alpha / rank == lora.scaling
    assert GatewayMerge(method="linear", lora=lora).gateway_rank_alpha(3) == (4, 8.0)
    with pytest.raises(ValueError, match="merge method"):
        GatewayMerge(method="mean", lora=lora)


def test_lora_pairs_require_both_factors() -> None:
    with pytest.raises(ValueError, match="no matching"):
        aggregate.lora_pairs({KEY_A: torch.zeros(1, 1)})


def test_lora_settings_validation_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.5)
    with pytest.raises(ValueError, match="target_modules"):
        LoraSettings(target_modules=())
    with pytest.raises(ValueError, match="unknown lora_config keys"):
        LoraSettings.from_dict({"rank": 8, "bogus": 1})
    ours, theirs = LoraSettings(), LoraSettings(rank=16)
    assert ours.differences(theirs) == ["rank: coordinator has 8, worker has 16"]
