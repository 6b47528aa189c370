"""The ``fedmoe`` command: coordinator, worker, status, gateway, demo and helpers."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.fields import DEFAULT_COORDINATOR_URL
from fedmoe.logs import setup_logging
from fedmoe.settings_cli import field_option, settings_command
from fedmoe.views import (
    print_loss_table,
    print_status,
    print_verdicts,
    print_worker_summaries,
)
from fedmoe.worker.options import WorkerOptions

app = typer.Typer(
    help="Federated LoRA experts with a staleness-aware coordinator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

# The client options of `status` and `gateway` are the worker's fields of the same name
# (typer reads these annotations at run time; mypy only needs the value types).
if TYPE_CHECKING:
    UrlOpt = str
    TokenOpt = str | None
    CaOpt = Path | None
else:
    UrlOpt = field_option(WorkerOptions, "coordinator_url")
    TokenOpt = field_option(WorkerOptions, "auth_token")
    CaOpt = field_option(WorkerOptions, "ca_cert")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error for humans and exit."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


LogLevelOpt = Annotated[str, typer.Option(help="Logging level.")]


@app.command()
@settings_command(CoordinatorSettings, fail)
def coordinator(settings: CoordinatorSettings, log_level: LogLevelOpt = "INFO") -> None:
    """Run the coordinator (HTTP API v1) until SIGINT/SIGTERM."""
    from fedmoe.api.server import serve
    from fedmoe.coordinator.errors import StateDirError

    setup_logging(log_level)
    try:
        serve(settings)
    except (StateDirError, ValueError, OSError) as error:
        fail(str(error))


@app.command()
@settings_command(WorkerOptions, fail)
def worker(
    settings: WorkerOptions,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write the summary here.")] = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Train one expert on local data and sync it every --sync-interval seconds."""
    from fedmoe.data import DataFormatError, load_examples

    try:  # a bad line is named at once, before torch and transformers are loaded
        examples = load_examples(settings.dataset)  # handed to the job: parsed once
    except (DataFormatError, OSError) as error:
        fail(str(error))
    import httpx
    import torch

    from fedmoe.worker.ddp_job import RankFailure, make_job
    from fedmoe.worker.job import FatalSyncError
    from fedmoe.worker.speed import SpeedSetupError
    from fedmoe.worker.trainer import TrainingDiverged

    setup_logging(log_level)
    if threads:
        torch.set_num_threads(threads)
    try:
        job = make_job(settings, examples)  # several ranks under torchrun, else one process
        _stop_on_signals(job.request_stop)
        summary = job.run()
    except (DataFormatError, FatalSyncError, TrainingDiverged, SpeedSetupError, OSError) as error:
        fail(str(error))
    except RankFailure as error:  # may quote a backend's "[file.cc:N]": not rich markup
        from rich.markup import escape

        fail(escape(str(error)), code=1)
    except httpx.TransportError as error:
        fail(f"coordinator {settings.coordinator_url} unreachable: {error}", code=1)
    if summary_json and summary:  # ranks other than 0 have no summary
        summary_json.write_text(json.dumps(summary, indent=2))


def _stop_on_signals(stop: Any) -> None:
    """First SIGINT/SIGTERM: finish the step, upload, exit. Second SIGINT: abort."""

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and getattr(handler, "seen", False):
            raise KeyboardInterrupt
        handler.seen = True  # type: ignore[attr-defined]
        err.print("stopping after a final upload (Ctrl-C again to abort)")
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@app.command()
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
    import time

    import httpx

    from fedmoe.client import ApiError, CoordinatorClient

    if watch:
        from fedmoe.watch import watch as watch_status

        if interval <= 0:
            fail(f"--interval must be > 0 seconds, got {interval}")
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            watch_status(console, client, interval=interval, sleep=time.sleep)
        return

    try:
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            data = client.status()
    except (httpx.HTTPError, ApiError) as error:
        fail(f"cannot read status from {coordinator_url}: {error}", code=1)
    if as_json:
        console.print_json(data.model_dump_json())
        return
    print_status(console, data)


@app.command()
def forget(
    worker: Annotated[str, typer.Option("--worker", help="The worker id to remove.")],
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
) -> None:
    """Remove a worker (admin): revoke it and rebuild its experts without its updates."""
    import httpx

    from fedmoe.client import ApiError, CoordinatorClient

    try:
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            report = client.forget(worker)
    except (httpx.HTTPError, ApiError) as error:
        fail(f"cannot forget {worker} at {coordinator_url}: {error}", code=1)
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


@app.command()
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
    max_new_tokens: Annotated[int, typer.Option(help="For --prompt.")] = 64,
    base_model: Annotated[str | None, typer.Option(help="Override the base model.")] = None,
) -> None:
    """Print the gateway; optionally save it (or an expert) as a PEFT adapter and generate.

    ``--prompt`` is routed to the expert whose domain it belongs to (``--merged``: the
    merged gateway, the old behaviour); the expert chosen is printed.
    """
    import tempfile

    import httpx

    from fedmoe.client import ApiError, CoordinatorClient
    from fedmoe.export import fetch_adapter_dir, generate, load_with_adapter
    from fedmoe.views import print_router

    setup_logging("WARNING")
    try:
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            info = client.gateway_info()
            console.print(
                f"gateway version {info.version}, merge method "
                f"{info.merge_method}, rank {info.lora_rank}"
            )
            for name, version in info.expert_versions.items():
                console.print(f"  {name}: version {version}, weight {info.weights[name]:.3f}")
            print_router(console, info.router)
            if prompt is not None and expert is None and output is None:
                _answer(client, prompt, merged, base_model, max_new_tokens)
                return
            if output is None and prompt is None:
                return
            directory = output or Path(tempfile.mkdtemp(prefix="fedmoe-adapter-"))
            written = fetch_adapter_dir(client, directory, expert=expert)
    except (httpx.HTTPError, ApiError) as error:
        fail(f"{coordinator_url}: {error}", code=1)
    console.print(f"wrote {written['name']} v{written['version']} as a PEFT adapter to {directory}")
    if prompt is not None:
        model, tokenizer = load_with_adapter(base_model or written["base_model"], directory)
        console.print(
            f"[bold]{prompt}[/]{generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)}"
        )


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


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(help="Training time of each worker.")] = 150.0,
    output: Annotated[Path, typer.Option(help="Where data, logs and adapters go.")] = Path(
        "demo_output"
    ),
    sync_interval: Annotated[float, typer.Option(help="Worker sync interval.")] = 10.0,
    base_model: Annotated[str, typer.Option(help="Base model for everything.")] = "tiny",
    train_count: Annotated[int, typer.Option(help="Training examples per domain.")] = 400,
) -> None:
    """Three domains, a coordinator and three workers on loopback, then a loss table."""
    from fedmoe.demo import DemoRun, run_demo, verdicts
    from fedmoe.views import print_routing_accuracy

    setup_logging("INFO")
    console.print(
        f"[bold]FedMoE demo[/]: generated Python/SQL/docs data, 3 workers for "
        f"{seconds:.0f}s, logs in {output / 'logs'}"
    )
    run = DemoRun(
        output=output,
        seconds=seconds,
        sync_interval=sync_interval,
        base_model=base_model,
        train_count=train_count,
    )
    table, summaries = run_demo(run)
    print_loss_table(console, table)
    print_routing_accuracy(console, run.routing_accuracy)
    print_worker_summaries(console, summaries)
    claims = verdicts(table)
    print_verdicts(console, claims)
    console.print(
        f"gateway written as a PEFT adapter to [bold]{run.gateway_dir}[/] "
        f"(results in {output / 'results.json'})"
    )
    if not all(holds for _, holds in claims):
        raise typer.Exit(1)


@app.command("export-tiny")
def export_tiny_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the HF model directory.")],
) -> None:
    """Write the built-in tiny preset as an HF model directory (config, weights, tokenizer)."""
    from fedmoe.tiny import export_tiny

    setup_logging("WARNING")
    export_tiny(directory)
    console.print(
        f"wrote the tiny preset to {directory}; load it with "
        "AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained"
    )


@app.command("make-demo-data")
def make_demo_data(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    train_count: Annotated[int, typer.Option(help="Training examples per domain.")] = 400,
    validation_count: Annotated[int, typer.Option(help="Validation examples.")] = 60,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Generate the demo's Python / SQL / docs datasets (train and validation JSONL)."""
    from fedmoe.demo_data import write_demo_datasets

    for domain, (train, validation) in write_demo_datasets(
        directory, train_count=train_count, validation_count=validation_count, seed=seed
    ).items():
        console.print(f"{domain}: {train} {validation}")


@app.command("serve")
def serve_command(
    coordinator_url: Annotated[
        str | None,
        typer.Option(
            "--coordinator-url",
            envvar="FEDMOE_COORDINATOR_URL",
            help="Load experts from this coordinator (hot-reloads new versions).",
        ),
    ] = None,
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Or load them offline from PEFT adapter directories.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    base_model: Annotated[str | None, typer.Option(help="Override the base model.")] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    auth_token: TokenOpt = None,
    tokens_file: Annotated[Path | None, typer.Option(help="JSON tokens file.")] = None,
    coordinator_token: Annotated[
        str | None, typer.Option(help="Token for the coordinator (default: --auth-token).")
    ] = None,
    ca_cert: CaOpt = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow no auth off loopback.")
    ] = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS key.")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens allowed.")] = 512,
    default_max_tokens: Annotated[int, typer.Option(help="When a request omits it.")] = 64,
    max_batch_size: Annotated[int, typer.Option(help="Requests per generate() call.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="Wait for requests to batch.")] = 5.0,
    reload_interval: Annotated[float, typer.Option(help="Seconds between reloads.")] = 5.0,
    router_fallback: Annotated[
        str | None, typer.Option(help="merged|mix (default: the coordinator's).")
    ] = None,
    gateway: Annotated[bool, typer.Option(help="Also serve the merged gateway.")] = True,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Serve every expert, the gateway and fedmoe-auto (routed) over an OpenAI-compatible API."""
    given: dict[str, Any] = {k: v for k, v in locals().items() if v is not None}
    from pydantic import ValidationError

    from fedmoe.serve.server import serve
    from fedmoe.serve.settings import ServeSettings

    given.pop("log_level")
    setup_logging(log_level)
    try:
        serve(ServeSettings(**given))
    except ValidationError as error:
        fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors()))
    except (ValueError, OSError, RuntimeError) as error:
        fail(str(error))


@app.command("export-vllm")
def export_vllm_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the adapters and command.")],
    coordinator_url: UrlOpt = DEFAULT_COORDINATOR_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    gateway: Annotated[bool, typer.Option(help="Also export the merged gateway.")] = True,
) -> None:
    """Write every expert (and the gateway) as PEFT adapters, the router, and a vLLM command."""
    import httpx

    from fedmoe.client import ApiError, CoordinatorClient
    from fedmoe.serve.vllm import export_for_vllm

    setup_logging("WARNING")
    try:
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            manifest = export_for_vllm(client, directory, gateway=gateway)
    except (httpx.HTTPError, ApiError) as error:
        fail(f"{coordinator_url}: {error}", code=1)
    for name, info in manifest["adapters"].items():
        console.print(f"{name}: v{info['version']} rank {info['rank']} → {info['path']}")
    for name, why in manifest["skipped"].items():
        console.print(f"[yellow]{name} left out:[/] {why}")
    console.print(f"router: {manifest['router'] or 'none (no signatures yet)'}")
    console.print(f"[bold]{manifest['command']}[/]")


def main() -> None:
    """Entry point for ``python -m fedmoe``."""
    app()


if __name__ == "__main__":
    main()
