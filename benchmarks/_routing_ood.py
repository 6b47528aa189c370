"""Out-of-domain arms of ``routing_bench``: which statistic tells a left-out domain apart.

Two statistics, each with a per-expert threshold at ``factor`` x the 99th percentile of
the domain's own training features' values (what a worker can measure on its own data):
the diagonal distance (``Router.distances``, the format 1 signature's only statistic) and
the subspace distance (``fedmoe.ood``, format 2). For each: in-domain routing accuracy
(a fallback counts as a miss) and the share of a left-out domain's held-out prompts that
fall back. And the default rule's accuracy and leave-one-out share by signature size.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmoe.featurizer import FeaturizerSettings
from fedmoe.routing import Router
from fedmoe.signature import DomainSignature

FACTORS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SIZES = (30, 60, 100, 400)


def _diagonal_q99(router: Router, train: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each expert's 99th percentile of its own training features' diagonal distance."""
    return {
        name: float(torch.quantile(router.distances(train[name])[:, i], 0.99))
        for i, name in enumerate(router.names)
    }


def _inside(
    router: Router, feats: torch.Tensor, statistic: str, q99: dict[str, float], factor: float
) -> list[str | None]:
    """The expert each request goes to, or None where the statistic sends it back."""
    if statistic == "subspace":
        strict = Router(router.signatures, margin=0.0, max_distance=None, ood_factor=factor)
        return [d.expert for d in strict.route_batch(feats)]
    loose = Router(router.signatures, margin=0.0, max_distance=None, ood_factor=0.0)
    return [
        d.expert if d.expert is not None and d.distance <= factor * q99[d.expert] else None
        for d in loose.route_batch(feats)
    ]


def statistic_comparison(
    router: Router, train: dict[str, torch.Tensor], features: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """Accuracy in-domain and leave-one-out fallback share, per statistic and factor."""
    rows = []
    q99 = _diagonal_q99(router, train)
    for statistic in ("diagonal", "subspace"):
        for factor in FACTORS:
            hits = sum(
                sum(e == d for e in _inside(router, f, statistic, q99, factor))
                for d, f in features.items()
            )
            loo = {
                d: sum(e is None for e in _inside(router.without(d), f, statistic, q99, factor))
                / len(f)
                for d, f in features.items()
            }
            rows.append(
                {
                    "statistic": statistic,
                    "factor": factor,
                    "accuracy": hits / sum(len(f) for f in features.values()),
                    "loo_fallback": loo,
                }
            )
    return rows


def by_signature_size(
    train: dict[str, torch.Tensor], features: dict[str, torch.Tensor], fp: str
) -> list[dict[str, Any]]:
    """The default rule with signatures over the first n training examples of each domain."""
    rows = []
    for size in SIZES:
        sigs = {
            d: DomainSignature.from_features(f[:size], FeaturizerSettings(), fp, min_count=1)
            for d, f in train.items()
        }
        router = Router(sigs)
        hits = sum(sum(x.expert == d for x in router.route_batch(f)) for d, f in features.items())
        loo = {
            d: sum(x.expert is None for x in router.without(d).route_batch(f)) / len(f)
            for d, f in features.items()
        }
        rows.append(
            {
                "examples": size,
                "accuracy": hits / sum(len(f) for f in features.values()),
                "loo_fallback": loo,
            }
        )
    return rows
