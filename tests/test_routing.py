"""Domain signatures and the router: aggregation, validation, serialisation, decisions.

The last tests use the real ``tiny`` base model on the demo's generated domains.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe.config import LoraSettings
from fedmoe.data import parse_record
from fedmoe.demo_data import DOMAINS, generate_domain
from fedmoe.featurizer import FEATURIZER_VERSION, FeaturizerSettings, featurize, request_text
from fedmoe.modeling import attach_lora, load_base_model
from fedmoe.routing import Router, router_from_payload
from fedmoe.signature import DomainSignature, SignatureError, compute_signature

SETTINGS = FeaturizerSettings()
FP = "config:abc/weights:def"


def unit(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows, dim=-1)


def cluster(center: list[float], count: int, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor(center)
    return unit(base + spread * torch.randn((count, base.numel()), generator=generator))


def signature(features: torch.Tensor, **kwargs: object) -> DomainSignature:
    return DomainSignature.from_features(features, SETTINGS, FP, min_count=10, **kwargs)


def test_fewer_examples_than_the_minimum_are_refused() -> None:
    with pytest.raises(SignatureError, match="at least 100 examples, got 99"):
        DomainSignature.from_features(cluster([1, 0, 0], 99), SETTINGS, FP)


def test_combine_is_the_statistics_of_the_pooled_examples() -> None:
    first, second = cluster([1, 0, 0], 30, seed=1), cluster([0, 1, 0], 50, seed=2)
    combined = DomainSignature.combine([signature(first), signature(second)])
    pooled = signature(torch.cat([first, second]))
    assert combined.count == 80
    assert torch.allclose(combined.mean, pooled.mean, atol=1e-6)
    assert torch.allclose(combined.var, pooled.var, atol=1e-6)


def test_noise_changes_the_shared_mean() -> None:
    features = cluster([1, 0, 0], 20)
    noisy = signature(features, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy.mean, signature(features).mean)
    assert bool((noisy.var >= 0).all())


def test_round_trips_through_json_and_safetensors() -> None:
    original = signature(cluster([1, 2, 3], 12))
    for copy in (
        DomainSignature.from_dict(original.to_dict()),
        DomainSignature.from_safetensors(original.to_safetensors()),
    ):
        assert torch.equal(copy.mean, original.mean) and torch.equal(copy.var, original.var)
        assert (copy.count, copy.featurizer, copy.base_fingerprint) == (12, SETTINGS, FP)
    assert original.to_dict()["featurizer"]["version"] == FEATURIZER_VERSION


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mean": [0.1, float("nan"), 0.2]}, "mean holds NaN or Inf"),
        ({"var": [0.1, 0.1]}, "var has shape"),
        ({"var": [0.1, -0.1, 0.1]}, "negative"),
        ({"count": 1.5}, "count must be an integer"),
        ({"count": 0}, "count must be >= 1"),
        ({"mean": "abc"}, "mean must be a list of numbers"),
        ({"featurizer": {"layer": 1, "colour": 2}}, "unknown featurizer settings"),
        ({"featurizer": {"prefix_tokens": 0}}, "prefix_tokens must be >= 1"),
    ],
)
def test_malformed_signatures_are_refused_with_the_reason(
    change: dict[str, object], message: str
) -> None:
    data = {**signature(cluster([1, 0, 0], 12)).to_dict(), **change}
    with pytest.raises(SignatureError, match=message):
        DomainSignature.from_dict(data)


def test_missing_fields_and_foreign_files_are_refused() -> None:
    data = signature(cluster([1, 0, 0], 12)).to_dict()
    del data["base_fingerprint"]
    with pytest.raises(SignatureError, match="lacks 'base_fingerprint'"):
        DomainSignature.from_dict(data)
    with pytest.raises(SignatureError, match="not a signature file"):
        DomainSignature.from_safetensors(b"not safetensors at all")


def test_signatures_of_different_featurizers_do_not_combine_or_route_together() -> None:
    one = signature(cluster([1, 0, 0], 12))
    other = DomainSignature.from_features(
        cluster([0, 1, 0], 12), FeaturizerSettings(prefix_tokens=8), FP, min_count=10
    )
    with pytest.raises(SignatureError, match="featurizer"):
        DomainSignature.combine([one, other])
    with pytest.raises(SignatureError, match="featurizer"):
        Router({"a": one, "b": other})


def axis(index: int, dim: int = 16) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(dim)]


# 16 dimensions: in fewer, the mean standardised distance of a domain's own points has
# so heavy a tail that some cross the default distance bound.
CENTERS = {"a": axis(0), "b": axis(1), "c": axis(2)}


def three_domain_router(**options: object) -> Router:
    centers = CENTERS
    signatures = {
        name: signature(cluster(center, 50, seed=i))
        for i, (name, center) in enumerate(centers.items())
    }
    return Router(signatures, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["cosine", "gaussian"])
def test_routes_each_cluster_to_its_expert(method: str) -> None:
    router = three_domain_router(method=method)
    for seed, (name, center) in enumerate(CENTERS.items(), start=10):
        decisions = router.route_batch(cluster(center, 20, seed=seed))
        assert all(d.expert == name and d.weights == {name: 1.0} for d in decisions)
        assert all(d.margin > 0 and d.fallback is None for d in decisions)


def test_a_request_between_two_domains_falls_back() -> None:
    between = unit(torch.tensor(axis(0)) + torch.tensor(axis(1)))
    merged = three_domain_router(margin=10.0, max_distance=None).route(between)
    assert merged.expert is None and merged.fallback == "merged" and merged.weights == {}
    assert merged.label == "fallback:merged"
    mix = three_domain_router(margin=10.0, max_distance=None, fallback="mix").route(between)
    assert mix.fallback == "mix" and set(mix.weights) == {"a", "b"}
    assert math.isclose(sum(mix.weights.values()), 1.0)


def test_a_request_far_from_every_domain_falls_back() -> None:
    router = three_domain_router(margin=0.0)
    decision = router.route(unit(torch.tensor(axis(5))))
    assert decision.expert is None and decision.distance > router.max_distance


def test_leaving_an_expert_out_and_describing() -> None:
    router = three_domain_router().without("c")
    assert router.names == ["a", "b"]
    description = router.describe()
    assert description["experts"] == {
        "a": {"count": 50, "format": 2},
        "b": {"count": 50, "format": 2},
    }
    assert description["featurizer"] == SETTINGS.to_dict()
    assert description["method"] == router.method


def test_router_from_payload() -> None:
    router = three_domain_router()
    payload = {
        "router": {"margin": 0.3, "fallback": "mix"},
        "signatures": {n: s.to_dict() for n, s in router.signatures.items()},
    }
    rebuilt = router_from_payload(payload)
    assert rebuilt is not None and rebuilt.names == ["a", "b", "c"]
    assert (rebuilt.margin, rebuilt.fallback) == (0.3, "mix")
    assert router_from_payload({"signatures": {}}) is None


def test_request_text_is_the_prompt_or_the_start_of_a_text_record() -> None:
    prompt = parse_record({"prompt": "Write SQL", "completion": "SELECT 1;"})
    assert request_text(prompt) == "Write SQL\n"
    text = parse_record({"text": "## Setting `x`"})
    assert request_text(text) == "## Setting `x`"


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_base_model("tiny", device="cpu")


def test_features_ignore_the_adapter(tiny) -> None:  # type: ignore[no-untyped-def]
    texts = ["SELECT id FROM t;", "def f(xs): return xs"]
    plain = featurize(tiny.model, tiny.tokenizer, texts, SETTINGS)
    peft_model = attach_lora(tiny.model, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)  # a trained adapter would change the hidden states
    try:
        with_adapter = featurize(peft_model, tiny.tokenizer, texts, SETTINGS)
    finally:
        peft_model.unload()
    assert torch.allclose(plain, with_adapter, atol=1e-6)
    assert plain.shape == (2, tiny.model.config.hidden_size)
    assert torch.allclose(plain.norm(dim=-1), torch.ones(2))


def test_routes_held_out_demo_prompts_with_the_tiny_model(tiny) -> None:  # type: ignore[no-untyped-def]
    examples = {d: [parse_record(r) for r in generate_domain(d, 140, seed=3)] for d in DOMAINS}
    signatures = {
        d: compute_signature(tiny.model, tiny.tokenizer, ex[:100], SETTINGS, tiny.fingerprint)
        for d, ex in examples.items()
    }
    router = Router(signatures)
    correct = total = 0
    for domain, held_out in examples.items():
        texts = [request_text(example, tiny.tokenizer) for example in held_out[100:]]
        decisions = router.route_texts(tiny.model, tiny.tokenizer, texts)
        correct += sum(decision.expert == domain for decision in decisions)
        total += len(decisions)
    assert correct / total >= 0.95


def test_routed_loss_weights_each_group_by_its_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    from fedmoe.batching import tokenize_example
    from fedmoe.evaluation import validation_loss
    from fedmoe.routed_eval import routed_loss
    from fedmoe.routing import RouteDecision

    examples = [parse_record(r) for r in generate_domain("sql_expert", 6, seed=4)]
    tokens = [tokenize_example(e, tiny.tokenizer, max_length=256) for e in examples]
    pad = tiny.tokenizer.pad_token_id
    to = [RouteDecision(name, {}, 1.0) for name in ("a", "b", "a", "b", "a", "b")]
    # both "experts" are the base model: the routed loss must equal its loss on all of them
    loss = routed_loss(to, examples, tiny.tokenizer, lambda d: (str(d.expert), tiny.model))
    assert math.isclose(loss, validation_loss(tiny.model, tokens, pad_token_id=pad), rel_tol=1e-5)
