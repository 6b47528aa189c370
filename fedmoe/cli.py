"""The ``fedmoe`` command: coordinator, worker, demo, serve and helpers.

The commands that talk to a running coordinator (status, forget, gateway, export-vllm)
live in ``fedmoe.cli_remote``; all are registered on ``app`` at the end of this module, in
the order ``fedmoe --help`` lists them.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from fedmoe.cli_common import CaOpt, TokenOpt, console, err, fail
from fedmoe.cli_remote import export_vllm_command, forget, gateway, status
from fedmoe.coordinator.settings import CoordinatorSettings
from fedmoe.logs import setup_logging
from fedmoe.settings_cli import settings_command
from fedmoe.views import print_loss_table, print_verdicts, print_worker_summaries
from fedmoe.worker.options import WorkerOptions

app = typer.Typer(
    help="Federated LoRA experts with a staleness-aware coordinator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

LogLevelOpt = Annotated[str, typer.Option(help="Logging level.")]


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


@settings_command(WorkerOptions, fail)
def worker(
    settings: WorkerOptions,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write the summary here.")] = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Train one expert on local data and sync it every --sync-interval seconds."""
    from fedmoe.client import tls_context
    from fedmoe.data import DataFormatError, load_examples

    try:  # a bad line or CA file is named at once, before torch and transformers are loaded
        examples = load_examples(settings.dataset)  # handed to the job: parsed once
        if settings.ca_cert is not None:
            tls_context(settings.ca_cert)
        if summary_json is not None and not summary_json.parent.is_dir():
            raise ValueError(
                f"--summary-json {summary_json}: {summary_json.parent} is no directory"
            )
    except (DataFormatError, OSError, ValueError) as error:
        fail(str(error))
    import httpx
    import torch

    from fedmoe.worker.ddp_job import RankFailure, make_job
    from fedmoe.worker.distributed import launched_by_torchrun, leave_process
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
    except ValueError as error:  # a setting this machine cannot honour, e.g. --device cuda
        fail(str(error))
    except RankFailure as error:  # may quote a backend's "[file.cc:N]": not rich markup
        from rich.markup import escape

        fail(escape(str(error)), code=1)
    except httpx.TransportError as error:
        fail(f"coordinator {settings.coordinator_url} unreachable: {error}", code=1)
    if summary_json and summary:  # ranks other than 0 have no summary
        try:
            summary_json.write_text(json.dumps(summary, indent=2))
        except OSError as error:  # trained and uploaded; only the summary is lost
            fail(f"cannot write --summary-json {summary_json}: {error}", code=1)
    if launched_by_torchrun():  # done: skip the teardown that can abort a gloo rank
        leave_process(0)


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
    try:
        run = DemoRun(
            output=output,
            seconds=seconds,
            sync_interval=sync_interval,
            base_model=base_model,
            train_count=train_count,
        )
        table, summaries = run_demo(run)
    except ValueError as error:
        fail(str(error))
    except OSError as error:  # e.g. an --output that cannot be created
        fail(f"demo output {output}: {error}", code=1)
    except RuntimeError as error:  # a worker or the coordinator failed; its log is named
        fail(str(error), code=1)
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


def export_tiny_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the HF model directory.")],
) -> None:
    """Write the built-in tiny preset as an HF model directory (config, weights, tokenizer)."""
    from fedmoe.tiny import export_tiny

    setup_logging("WARNING")
    try:
        export_tiny(directory)
    except OSError as error:  # an unwritable place, or a file where the directory goes
        fail(f"cannot write the tiny preset to {directory}: {error}")
    console.print(
        f"wrote the tiny preset to {directory}; load it with "
        "AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained"
    )


def make_demo_data(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    train_count: Annotated[int, typer.Option(min=0, help="Training examples per domain.")] = 400,
    validation_count: Annotated[int, typer.Option(min=0, help="Validation examples.")] = 60,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Generate the demo's Python / SQL / docs datasets (train and validation JSONL)."""
    from fedmoe.demo_data import write_demo_datasets

    try:
        written = write_demo_datasets(
            directory, train_count=train_count, validation_count=validation_count, seed=seed
        )
    except OSError as error:
        fail(f"cannot write the demo datasets to {directory}: {error}")
    for domain, (train, validation) in written.items():
        console.print(f"{domain}: {train} {validation}")


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
    import httpx
    from pydantic import ValidationError

    from fedmoe.client import ApiError
    from fedmoe.serve.server import serve
    from fedmoe.serve.settings import ServeSettings

    given.pop("log_level")
    setup_logging(log_level)
    try:
        serve(ServeSettings(**given))
    except ValidationError as error:
        fail("; ".join(_flagged(e["loc"], str(e["msg"])) for e in error.errors()))
    except (httpx.HTTPError, ApiError) as error:  # the coordinator to load experts from
        fail(f"coordinator {coordinator_url}: {error}", code=1)
    except (ValueError, OSError, RuntimeError) as error:
        fail(str(error))


def _flagged(location: tuple[int | str, ...], message: str) -> str:
    """A settings error as the user typed it: ``--flag: message`` (the model's own: bare)."""
    message = message.removeprefix("Value error, ")
    return f"--{str(location[0]).replace('_', '-')}: {message}" if location else message


app.command()(coordinator)
app.command()(worker)
app.command()(status)
app.command()(forget)
app.command()(gateway)
app.command()(demo)
app.command("export-tiny")(export_tiny_command)
app.command("make-demo-data")(make_demo_data)
app.command("serve")(serve_command)
app.command("export-vllm")(export_vllm_command)


def main() -> None:
    """Entry point for ``python -m fedmoe``."""
    app()


if __name__ == "__main__":
    main()
