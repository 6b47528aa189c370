"""Typer options generated from a settings model, so each option is declared once.

``settings_command(Model, fail)`` decorates a command whose ``settings`` parameter is
replaced by one option per leaf field of ``Model`` (see ``fedmoe.fields.flat_fields``):
the flag, its help text, its default shown in ``--help``, its choices and its
``FEDMOE_*`` variable all come from the field. Only the options given on the command
line or in the environment reach the model, so its defaults and validators stay the
single source of truth (and ``model_fields_set`` tells a given option from a default).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import typer
from pydantic import BaseModel, SecretStr, ValidationError

from fedmoe.fields import FlatField, flat_fields, nest, parse_text


@dataclass(frozen=True)
class OptionDoc:
    """One option of a generated command, as the README's table shows it."""

    flag: str
    env: str | None
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False


#: The options of every command built by ``settings_command``, by command function name.
OPTION_DOCS: dict[str, list[OptionDoc]] = {}

#: Where a value must come from to reach the model (click's ``ParameterSource`` names).
GIVEN = ("COMMANDLINE", "ENVIRONMENT")
CONTEXT = "fedmoe_context"


def _value_type(field: FlatField) -> Any:
    """The field's type without ``None``: what one flag value is parsed into."""
    annotation = field.info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        # a number or a keyword (--server-lr 0.5 / auto): text, which pydantic then parses
        annotation = options[0] if len(options) == 1 else str
    return annotation


def _typer_type(field: FlatField) -> Any:
    """The annotation typer parses the flag with (text for lists and dicts)."""
    value_type = _value_type(field)
    if field.kind != "scalar" or value_type is SecretStr:
        return str
    if value_type in (int, float, bool, str, Path) or get_origin(value_type) is Literal:
        return value_type
    raise TypeError(f"no command-line form for {field.name}: {field.info.annotation!r}")


def shown_default(field: FlatField) -> Any:
    """The default as ``--help`` and the README show it (``None``: none worth showing)."""
    if field.info.is_required():
        return None
    default = field.info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel) or default is False or default in (None, "", {}, []):
        return None
    if isinstance(default, list | tuple):
        return ",".join(map(str, default))
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items())
    return default


def _option(field: FlatField) -> inspect.Parameter:
    flag = field.flag
    if _typer_type(field) is bool and field.info.get_default() is True:
        flag = f"{flag}/--no-{field.flag[2:]}"
    # The default is only shown: options not given never reach the model (see GIVEN).
    option = typer.Option(
        ... if field.info.is_required() else shown_default(field),
        flag,
        help=field.info.description,
        envvar=field.env,
    )
    annotation = _typer_type(field)
    if not field.info.is_required():
        annotation = annotation | None
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def field_option(model: type[BaseModel], name: str) -> Any:
    """``Annotated[type, typer.Option(...)]`` for one field, for a command that takes it alone.

    ``fedmoe status`` and ``fedmoe gateway`` take the worker's ``--coordinator-url``,
    ``--auth-token`` and ``--ca-cert`` this way: same flag, help and variable.
    """
    field = next(f for f in flat_fields(model) if f.name == name)
    option = typer.Option(field.flag, help=field.info.description, envvar=field.env)
    annotation = _typer_type(field)
    if field.info.get_default() is None:
        annotation = annotation | None
    return Annotated[annotation, option]


def _field_doc(field: FlatField) -> OptionDoc:
    value_type = _value_type(field)
    return OptionDoc(
        flag=field.flag,
        env=field.env,
        default=shown_default(field),
        help=field.info.description or "",
        choices=get_args(value_type) if get_origin(value_type) is Literal else (),
        required=field.info.is_required(),
    )


def _own_doc(parameter: inspect.Parameter) -> OptionDoc:
    info = next(
        (m for m in getattr(parameter.annotation, "__metadata__", ()) if hasattr(m, "help")),
        None,
    )
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    return OptionDoc(
        flag="--" + parameter.name.replace("_", "-"),
        env=None,
        default=default,
        help=getattr(info, "help", None) or "",
    )


def _source(context: typer.Context, name: str) -> str | None:
    source = context.get_parameter_source(name)
    return source.name if source is not None else None


def describe_errors(error: ValidationError, fields: list[FlatField]) -> str:
    """One line naming each bad option by its flag (also inside validators' messages)."""
    flags = {field.path: field.flag for field in fields}
    # Multi-word field names in a message are the settings' names for these flags.
    names = {field.path[-1]: field.flag for field in fields if "_" in field.path[-1]}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    parts = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        if pattern is not None:
            message = pattern.sub(lambda match: names[match.group(1)], message)
        loc = tuple(str(part) for part in item["loc"])
        where = next((flags[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in flags), None)
        parts.append(f"{where}: {message}" if where and where not in message else message)
    return "; ".join(parts)


def build_settings(
    model: type[BaseModel], given: list[tuple[FlatField, Any]], fields: list[FlatField]
) -> Any:
    """Validate the given options into ``model``; a bad one raises ``ValueError`` naming it."""
    try:
        values = [(f, parse_text(f, v) if isinstance(v, str) else v) for f, v in given]
        return model(**nest(values))
    except ValidationError as error:
        raise ValueError(describe_errors(error, fields)) from None


def settings_command(
    model: type[BaseModel], fail: Callable[[str], NoReturn]
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one option per field of ``model``; it gets ``settings=model(...)``."""
    fields = flat_fields(model)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.name != "settings"
        ]
        clash = {p.name for p in own} & {f.name for f in fields}
        if clash:
            raise TypeError(
                f"options {sorted(clash)} are generated from {model.__name__}: "
                "remove the hand-written ones"
            )

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            context: typer.Context = kwargs.pop(CONTEXT)
            given = [(f, kwargs.pop(f.name)) for f in fields]
            given = [(f, v) for f, v in given if _source(context, f.name) in GIVEN]
            try:
                settings = build_settings(model, given, fields)
            except ValueError as error:
                fail(str(error))
            command(settings=settings, **kwargs)

        context = inspect.Parameter(
            CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        parameters = [context, *(_option(f) for f in fields), *own]
        OPTION_DOCS[command.__name__] = [_field_doc(f) for f in fields] + [_own_doc(p) for p in own]
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
