"""Out-of-domain detection: the signature's subspace, the router's rule, format 1 signatures.

The last test uses the real ``tiny`` base model on the demo's generated domains: with one
expert left out, its domain's held-out prompts must fall back.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fedmoe.coordinator.signatures import METADATA_KEY, decode_book, encode_book
from fedmoe.data import parse_record
from fedmoe.demo_data import DOMAINS, generate_domain
from fedmoe.featurizer import FeaturizerSettings, featurize, request_text
from fedmoe.modeling import load_base_model
from fedmoe.ood import QUANTILE_LEVELS, Subspace
from fedmoe.routing import Router, router_from_payload
from fedmoe.signature import DomainSignature, SignatureError

SETTINGS = FeaturizerSettings()
FP = "config:abc/weights:def"
DIM = 16


def line_domain(count: int, seed: int, offset: int = 0) -> torch.Tensor:
    """Unit features spread widely along one direction (axes 1 and 2 together)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.zeros(DIM)
    center[offset] = 1.0
    along = torch.zeros(DIM)
    along[offset + 1] = along[offset + 2] = 0.5**0.5
    x = center + 0.6 * torch.randn(count, 1, generator=g) * along
    x = x + 0.01 * torch.randn(count, DIM, generator=g)
    return torch.nn.functional.normalize(x, dim=-1)


def signature(features: torch.Tensor, **kwargs: object) -> DomainSignature:
    return DomainSignature.from_features(features, SETTINGS, FP, min_count=10, **kwargs)


def off_line_request(offset: int = 0) -> torch.Tensor:
    """Close to the domain's centre per dimension, but across the direction it varies along."""
    x = torch.zeros(DIM)
    x[offset], x[offset + 1], x[offset + 2] = 1.0, 0.3, -0.3
    return torch.nn.functional.normalize(x, dim=-1)


def test_the_subspace_tells_a_request_off_the_domains_shape_from_its_own() -> None:
    domain, other = line_domain(200, seed=1), line_domain(200, seed=2, offset=8)
    router = Router({"a": signature(domain), "b": signature(other)})
    held_out = router.route_batch(line_domain(50, seed=3))
    assert all(d.expert == "a" and d.ood is not None and d.ood <= 1 for d in held_out)
    decision = router.route(off_line_request())
    # the diagonal bound alone lets it in; the subspace distance does not
    assert decision.distance <= router.max_distance  # type: ignore[operator]
    assert decision.expert is None and decision.fallback == "merged"
    assert decision.ood is not None and decision.ood > 1
    assert decision.to_dict()["ood"] == decision.ood
    # the test can be turned off: then the old rule answers
    assert Router(router.signatures, ood_factor=0).route(off_line_request()).expert == "a"


def test_quantiles_are_the_domains_own_distances() -> None:
    features = line_domain(300, seed=4)
    sig = signature(features)
    assert sig.format == 2 and sig.subspace is not None
    distances = sig.subspace.distance(features, sig.mean)
    for level, value in zip(QUANTILE_LEVELS, sig.subspace.quantiles, strict=True):
        share = float((distances <= value + 1e-9).double().mean())
        assert share == pytest.approx(level, abs=0.01)


def test_combined_subspaces_decide_like_one_fitted_on_the_pool() -> None:
    first, second = line_domain(150, seed=5), line_domain(150, seed=6)
    combined = DomainSignature.combine([signature(first), signature(second)])
    pooled = signature(torch.cat([first, second]))
    assert combined.subspace is not None and pooled.subspace is not None
    assert combined.subspace.rank == pooled.subspace.rank
    probe = torch.cat([line_domain(40, seed=7), off_line_request()[None]])
    a = combined.subspace.distance(probe, combined.mean)
    b = pooled.subspace.distance(probe, pooled.mean)
    assert torch.allclose(a, b, rtol=0.2, atol=0.05)
    assert combined.subspace.threshold == pytest.approx(pooled.subspace.threshold, rel=0.2)


def test_subspace_round_trips_and_noise_keeps_it_orthonormal() -> None:
    sig = signature(line_domain(100, seed=8))
    for copy in (
        DomainSignature.from_dict(json.loads(json.dumps(sig.to_dict()))),
        DomainSignature.from_safetensors(sig.to_safetensors()),
        decode_book(encode_book({"w1": sig}))["w1"],
    ):
        assert copy.subspace is not None and sig.subspace is not None
        assert torch.allclose(copy.subspace.basis, sig.subspace.basis)
        assert copy.subspace.quantiles == pytest.approx(sig.subspace.quantiles)
    noisy = signature(line_domain(100, seed=8), noise=1e-3, generator=torch.Generator())
    assert noisy.subspace is not None and sig.subspace is not None
    assert not torch.allclose(noisy.subspace.basis, sig.subspace.basis)  # checked orthonormal


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"basis": [[1.0, 0.0], [1.0, 0.0]]}, "basis"),
        ({"quantiles": [2.0, 1.0, 3.0]}, "must not decrease"),
        ({"quantiles": [1.0]}, "quantiles must hold 3"),
        ({"eigenvalues": [-1.0]}, "eigenvalues"),
        ({"residual": float("nan")}, "residual"),
        ({"basis": "x"}, "basis"),
    ],
)
def test_malformed_subspaces_are_refused_with_the_reason(
    change: dict[str, object], phrase: str
) -> None:
    data = signature(line_domain(100, seed=9), rank=1).to_dict()
    data["subspace"] = {**data["subspace"], **change}
    with pytest.raises(SignatureError, match=phrase):
        DomainSignature.from_dict(data)
    with pytest.raises(SignatureError, match="format 2 signature needs its subspace"):
        DomainSignature.from_dict({**data, "subspace": None})
    with pytest.raises(SignatureError, match="unknown signature format"):
        DomainSignature.from_dict({**data, "format": 3})


def test_format_1_signatures_load_and_route_by_the_old_rule(caplog) -> None:  # type: ignore[no-untyped-def]
    new = signature(line_domain(200, seed=1))
    old_json = {k: v for k, v in new.to_dict().items() if k not in ("format", "subspace")}
    old = DomainSignature.from_dict(old_json)  # as an older worker sends it
    assert old.format == 1 and old.subspace is None
    # an older coordinator's book file: no format key, mean and var only
    book = save_safetensors(
        {"w/mean": new.mean, "w/var": new.var},
        metadata={METADATA_KEY: json.dumps({"w": old.metadata()})},
    )
    assert decode_book(book)["w"].format == 1
    # combining with a format 1 part drops the subspace (nothing to pool it with)
    assert DomainSignature.combine([new, old]).subspace is None
    other = signature(line_domain(200, seed=2, offset=8))
    with caplog.at_level(logging.WARNING, logger="fedmoe.routing"):
        router = router_from_payload(
            {"signatures": {"a": old_json, "b": other.to_dict()}, "router": {"ood_factor": 3}}
        )
    assert router is not None and "a are format 1" in caplog.text
    decision = router.route(off_line_request())
    assert decision.expert == "a" and decision.ood is None  # the diagonal rule only
    assert router.describe()["experts"]["a"]["format"] == 1


def test_subspace_shape_must_match_the_mean() -> None:
    sig = signature(line_domain(100, seed=10))
    sub = Subspace.from_dict({**sig.to_dict()["subspace"]})
    with pytest.raises(SignatureError, match="subspace has dimension"):
        DomainSignature(sig.mean[:8], sig.var[:8], sig.count, SETTINGS, FP, sub)


def test_a_left_out_domains_prompts_fall_back_with_the_tiny_model() -> None:
    torch.manual_seed(0)
    tiny = load_base_model("tiny", device="cpu")
    examples = {d: [parse_record(r) for r in generate_domain(d, 125, seed=3)] for d in DOMAINS}
    features = {
        d: featurize(
            tiny.model, tiny.tokenizer, [request_text(e, tiny.tokenizer) for e in ex], SETTINGS
        )
        for d, ex in examples.items()
    }
    signatures = {
        d: DomainSignature.from_features(f[:100], SETTINGS, tiny.fingerprint)
        for d, f in features.items()
    }
    router = Router(signatures)
    held_out = {d: f[100:] for d, f in features.items()}
    routed = sum(sum(x.expert == d for x in router.route_batch(f)) for d, f in held_out.items())
    assert routed / sum(len(f) for f in held_out.values()) >= 0.95
    for domain in DOMAINS:
        decisions = router.without(domain).route_batch(held_out[domain])
        fell_back = sum(x.expert is None for x in decisions) / len(decisions)
        assert fell_back >= 0.9, (domain, fell_back)
    # the old rule (the diagonal bound only) lets most of them through
    old = Router(signatures, ood_factor=0)
    caught = [
        sum(x.expert is None for x in old.without(d).route_batch(held_out[d])) / 50 for d in DOMAINS
    ]
    assert min(caught) < 0.5
