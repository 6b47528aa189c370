"""The ``fedmoe`` commands that talk to a running coordinator: status, forget, gateway, export-vllm.

Each takes the worker's ``--coordinator-url``, ``--auth-token`` and ``--ca-cert`` and
reads (or, for ``forget``, changes) the coordinator's state through
``fedmoe.client.CoordinatorClient``; ``fedmoe.cli`` registers them on the app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedmoe.cli_common import CaOpt, TokenOpt, UrlOpt, console, fail
from fedmoe.fields import DEFAULT_COORDINATOR_URL
from fedmoe.logs import setup_logging
from fedmoe.views import print_status

if TYPE_CHECKING:
    from fedmoe.client import CoordinatorClient
    from fedmoe.schemas import GatewayInfo


@contextmanager
def _connected(
    url: str, token: str | None, ca_cert: Path | None, failure: str
) -> Iterator[CoordinatorClient]:
    """A client of the coordinator at ``url``; an HTTP or API error exits: ``failure: error``."""
    import httpx

    from fedmoe.client import ApiError

    try:
        with client_for(url, token, ca_cert) as client:
            yield client
    except (httpx.HTTPError, ApiError) as error:
        fail(f"{failure}: {error}", code=1)


@contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """A local file error while writing ``directory`` exits naming it (not a traceback)."""
    try:
        yield
    except OSError as error:  # unwritable, missing parent, a file where the directory goes
        fail(f"cannot write to {directory}: {error}")


@contextmanager
def _base_model(name: str | None) -> Iterator[None]:
    """A base model that cannot be loaded (a missing directory, a foreign one) exits naming it."""
    try:
        yield
    except (OSError, ValueError) as error:
        fail(str(error) if name is None else f"--base-model {name}: {error}")


def client_for(url: str, token: str | None, ca_cert: Path | None) -> CoordinatorClient:
    """A client of ``url``; a bad ``--ca-cert`` exits with the client's message."""
    from fedmoe.client import CoordinatorClient

    try:
        return CoordinatorClient(url, token=token, ca_cert=ca_cert)
    except ValueError as error:
        fail(str(error))


def status(
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Live view (federated eval, refusals) until Ctrl-C.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between --watch refreshes.")] = 3.0,
) -> None:
    """Show experts, gateway and workers."""

    if watch:
        from fedmoe.watch import pause_until_interrupted
        from fedmoe.watch import watch as watch_status

        if interval <= 0:
            fail(f"--interval must be > 0 seconds, got {interval}")
        with (
            client_for(coordinator_url, auth_token, ca_cert) as client,
            pause_until_interrupted() as pause,
        ):
            watch_status(console, client, interval=interval, sleep=pause)
        return

    failure = f"cannot read status from {coordinator_url}"
    with _connected(coordinator_url, auth_token, ca_cert, failure) as client:
        data = client.status()
    if as_json:
        console.print_json(data.model_dump_json())
        return
    print_status(console, data)


def forget(
    worker: Annotated[str, typer.Option("--worker", help="The worker id to remove.")],
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
) -> None:
    """Remove a worker (admin): revoke it and rebuild its experts without its updates."""
    failure = f"cannot forget {worker} at {coordinator_url}"
    with _connected(coordinator_url, auth_token, ca_cert, failure) as client:
        report = client.forget(worker)
    if as_json:
        console.print_json(report.model_dump_json())
        return
    note = " (it had been forgotten before)" if report.already_forgotten else ""
    console.print(f"worker {worker} revoked{note}; {report.updates_removed} update(s) removed")
    for entry in report.experts:
        console.print(
            f"  {entry.expert}: v{entry.old_version} -> v{entry.new_version}, "
            f"{entry.updates_removed} update(s) removed"
        )
    console.print(f"gateway version {report.gateway_version}")


def gateway(
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    output: Annotated[Path | None, typer.Option(help="Write a PEFT adapter directory.")] = None,
    expert: Annotated[str | None, typer.Option(help="An expert instead of the gateway.")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Generate a completion (routed to one expert).")
    ] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="With --prompt: the merged gateway, not routed.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="For --prompt.")] = 64,
    base_model: Annotated[str | None, typer.Option(help="Override the base model.")] = None,
) -> None:
    """Print the gateway; optionally save it (or an expert) as a PEFT adapter and generate.

    --prompt is routed to the expert whose domain it belongs to (--merged: the merged
    gateway, the old behaviour); the expert chosen is printed.
    """
    import tempfile

    from fedmoe.export import fetch_adapter_dir, generate, load_with_adapter

    setup_logging("WARNING")
    with _connected(coordinator_url, auth_token, ca_cert, coordinator_url) as client:
        _print_gateway(client.gateway_info())
        if prompt is not None and expert is None and output is None:
            with _base_model(base_model):
                _answer(client, prompt, merged, base_model, max_new_tokens)
            return
        if output is None and prompt is None:
            return
        directory = output or Path(tempfile.mkdtemp(prefix="fedmoe-adapter-"))
        with _writing(directory):
            written = fetch_adapter_dir(client, directory, expert=expert)
    console.print(f"wrote {written['name']} v{written['version']} as a PEFT adapter to {directory}")
    if prompt is not None:
        with _base_model(base_model):
            model, tokenizer = load_with_adapter(base_model or written["base_model"], directory)
        console.print(
            f"[bold]{prompt}[/]{generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)}"
        )


def _print_gateway(info: GatewayInfo) -> None:
    """The gateway's version, merge method and rank, its experts' versions, its router."""
    from fedmoe.views import print_router

    console.print(
        f"gateway version {info.version}, merge method {info.merge_method}, rank {info.lora_rank}"
    )
    for name, version in info.expert_versions.items():
        console.print(f"  {name}: version {version}, weight {info.weights[name]:.3f}")
    print_router(console, info.router)


def _answer(
    client: Any, prompt: str, merged: bool, base_model: str | None, max_new_tokens: int
) -> None:
    """Generate for ``prompt`` with the routed expert (or the merged gateway) and say which."""
    from fedmoe.routed_gateway import answer_prompt

    answer = answer_prompt(
        client, prompt, merged=merged, base_model=base_model, max_new_tokens=max_new_tokens
    )
    decision = answer.decision
    if decision is None:
        console.print("served by: gateway (merged, not routed)")
    else:
        scores = ", ".join(f"{name} {score:.3g}" for name, score in decision.scores.items())
        console.print(
            f"served by: {answer.served_by} (routed; margin {decision.margin:.3g}; scores {scores})"
        )
    console.print(f"[bold]{prompt}[/]{answer.text}")


def export_vllm_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the adapters and command.")],
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    gateway: Annotated[bool, typer.Option(help="Also export the merged gateway.")] = True,
) -> None:
    """Write every expert (and the gateway) as PEFT adapters, the router, and a vLLM command."""
    from fedmoe.serve.vllm import export_for_vllm

    setup_logging("WARNING")
    with (
        _connected(coordinator_url, auth_token, ca_cert, coordinator_url) as client,
        _writing(directory),
    ):
        manifest = export_for_vllm(client, directory, gateway=gateway)
    for name, info in manifest["adapters"].items():
        console.print(f"{name}: v{info['version']} rank {info['rank']} → {info['path']}")
    for name, why in manifest["skipped"].items():
        console.print(f"[yellow]{name} left out:[/] {why}")
    console.print(f"router: {manifest['router'] or 'none (no signatures yet)'}")
    console.print(f"[bold]{manifest['command']}[/]")
