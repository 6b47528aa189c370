"""Field-level facts shared by the settings models, the HTTP schemas and the CLI.

Only the standard library and pydantic are imported here, so the API layer, the
coordinator and the worker can all use these types without pulling in each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, StringConstraints
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

#: Worker ids and update ids: what the API accepts, the worker checks and the scripts test.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
WorkerId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
DEFAULT_COORDINATOR_URL = "http://127.0.0.1:5000"
#: Expert names: also file names in the state directory.
EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _existing_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    return path


#: A file that must exist when given (TLS certificate and key): refused with the settings,
#: before a state directory is made or a port bound, not by the TLS layer's bare errno.
ExistingFile = Annotated[Path | None, AfterValidator(_existing_file)]

StalenessKind = Literal["inverse", "constant", "polynomial", "hinge", "exponential"]
MergeMethod = Literal["cat", "linear", "svd"]
NormPolicy = Literal["clip", "reject"]
UploadDtype = Literal["float32", "bfloat16", "float16"]
RouterFallback = Literal["merged", "mix"]
#: Server-side aggregation: apply each update at once, or buffer K of them (FedBuff).
StrategyKind = Literal["async", "fedbuff"]
#: The server optimizer over the aggregated delta (a pseudo-gradient).
ServerOptimizerKind = Literal["sgd", "nesterov", "adam"]
RobustAggregation = Literal["none", "median", "trimmed_mean"]
DpAccountant = Literal["rdp", "prv"]
#: ``--server-lr``: a number, "auto" (η from the workers active on the expert), "mean" (η
#: from them and the staleness decay at their typical staleness) or "agree" (η from them
#: and the agreement of the expert's recent deltas).
ServerLr = float | Literal["auto", "mean", "agree"]
#: Most seconds a download waits for the version a worker's round will make (``wait``).
MAX_PULL_WAIT = 10.0
# what happens to write-ahead log segments a snapshot covers: archived, or deleted
DeltaRetention = Literal["keep", "drop"]

# Router defaults, chosen by benchmarks/routing_bench.py (see benchmarks/RESULTS.md); here so
# that the settings (and the CLI) need not import torch to show them.
DEFAULT_ROUTER_MARGIN = 0.1
DEFAULT_ROUTER_MAX_DISTANCE = 2.5
DEFAULT_ROUTER_FALLBACK: RouterFallback = "merged"
DEFAULT_ROUTER_OOD_FACTOR = 3.0
DEFAULT_SIGNATURE_MIN_COUNT = 100

STALENESS_KINDS: tuple[StalenessKind, ...] = get_args(StalenessKind)
MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
UPLOAD_DTYPES: tuple[UploadDtype, ...] = get_args(UploadDtype)
STRATEGY_KINDS: tuple[StrategyKind, ...] = get_args(StrategyKind)
SERVER_OPTIMIZERS: tuple[ServerOptimizerKind, ...] = get_args(ServerOptimizerKind)
#: η when --server-lr is not given, per server optimizer (nesterov: DiLoCo's outer step).
#: sgd: "auto" (1/K for K active workers; 1 with one worker), chosen by
#: benchmarks/strategy_bench.py (README "Update rule and gateway").
DEFAULT_SERVER_LR: dict[str, ServerLr] = {"sgd": "auto", "nesterov": 0.7, "adam": 0.01}
#: Momentum when --server-momentum is not given (DiLoCo's 0.9 for nesterov, FedAdam's β1).
DEFAULT_SERVER_MOMENTUM: dict[str, float] = {"sgd": 0.0, "nesterov": 0.9, "adam": 0.9}

#: The parameters each staleness decay reads; any other one given would be ignored.
STALENESS_PARAMETERS: dict[str, tuple[str, ...]] = {
    "inverse": ("a",),
    "constant": (),
    "polynomial": ("a",),
    "hinge": ("a", "b"),
    "exponential": ("a",),
}


def check_staleness_parameters(
    kind: str, a: float | None, b: int | None, *, label: str = "staleness parameter "
) -> None:
    """Refuse a parameter the ``kind`` of decay would ignore, naming the kinds that use it."""
    for name, value in (("a", a), ("b", b)):
        if value is not None and name not in STALENESS_PARAMETERS.get(kind, (name,)):
            users = [k for k, names in STALENESS_PARAMETERS.items() if name in names]
            raise ValueError(
                f"{label}{name} has no effect on the {kind!r} staleness decay "
                f"(only on: {', '.join(users)})"
            )


#: A training speed switch: "auto" takes the measured default of the device kind.
Switch = Literal["auto", "on", "off"]
#: How the training loss is computed: all logits at once, in chunks, or Liger's fused kernel.
CrossEntropyKind = Literal["auto", "full", "chunked", "liger"]

#: torch device names a worker accepts ("auto" picks cuda, then mps, then cpu).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?|xpu(:[0-9]+)?)$"


@dataclass(frozen=True)
class Flag:
    """How a settings field appears on the command line, when not by its own name.

    Put it in the field's ``Annotated`` metadata: ``name`` replaces the flag derived from
    the field name (``learning_rate`` is ``--lr``); on a nested settings model ``prefix``
    replaces the default ``<field>_`` before each of its fields' flags ("" for none).
    """

    name: str | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class FlatField:
    """One leaf field of a settings model, as the CLI and the environment name it."""

    path: tuple[str, ...]
    name: str
    info: FieldInfo

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--lora-rank``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``FEDMOE_LORA_RANK``."""
        return "FEDMOE_" + self.name.upper()

    @property
    def kind(self) -> str:
        """``list``, ``dict`` or ``scalar``: how a text value is parsed (see ``parse_text``)."""
        origin = get_origin(self.info.annotation)
        if origin in (list, tuple):
            return "list"
        return "dict" if origin is dict else "scalar"


def _flag_of(info: FieldInfo) -> Flag:
    return next((m for m in info.metadata if isinstance(m, Flag)), Flag())


def flat_fields(model: type[BaseModel], prefix: str = "") -> list[FlatField]:
    """The leaf fields of ``model``, nested settings models flattened with a name prefix."""
    out: list[FlatField] = []
    for name, info in model.model_fields.items():
        flag, annotation = _flag_of(info), info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner = flag.prefix if flag.prefix is not None else f"{name}_"
            out += [
                FlatField((name, *f.path), f.name, f.info)
                for f in flat_fields(annotation, prefix + inner)
            ]
        else:
            out.append(FlatField((name,), prefix + (flag.name or name), info))
    return out


def nest(values: Iterable[tuple[FlatField, Any]]) -> dict[str, Any]:
    """Turn flat ``(field, value)`` pairs into the nested dict the model validates."""
    data: dict[str, Any] = {}
    for field, value in values:
        node = data
        for key in field.path[:-1]:
            node = node.setdefault(key, {})
        node[field.path[-1]] = value
    return data


def nest_flat_names(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with nested fields given by their flat names moved under their parents.

    So ``CoordinatorSettings(lora_rank=4)`` means ``lora.rank``, as ``--lora-rank`` does;
    a flat name wins over the same field inside a parent given as a dict or model.
    """
    flat = [f for f in flat_fields(model) if len(f.path) > 1 and f.name in data]
    out = {key: value for key, value in data.items() if key not in {f.name for f in flat}}
    for field in flat:
        node = out
        for key in field.path[:-1]:
            parent = node.get(key, {})
            node[key] = parent.model_dump() if isinstance(parent, BaseModel) else dict(parent)
            node = node[key]
        node[field.path[-1]] = data[field.name]
    return out


def parse_text(field: FlatField, text: str) -> Any:
    """A flag's or variable's text as the field's value: lists ``a,b``, dicts ``a=1,b=2``.

    JSON (``["a", "b"]``, ``{"a": 1}``) is accepted too; scalars are left to pydantic.
    """
    if field.kind == "scalar":
        return text
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        return json.loads(stripped)
    items = [item.strip() for item in stripped.split(",") if item.strip()]
    if field.kind == "list":
        return items
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{field.flag} expects name=number pairs, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


class FlatEnvSource(PydanticBaseSettingsSource):
    """``FEDMOE_<FLAG>`` variables, parsed exactly as the flags are (``parse_text``).

    Nested fields are read by their flat names (``FEDMOE_LORA_RANK`` for ``lora.rank``),
    so a variable and its flag always correspond.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: ``__call__`` reads every field at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """The fields set in the environment, as a nested dict."""
        fields = [f for f in flat_fields(self.settings_cls) if f.env in self.environ]
        return nest((f, parse_text(f, self.environ[f.env])) for f in fields)
