"""The ``fedmoe`` command: coordinator, worker, status, gateway, demo and helpers."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedmoe.logs import setup_logging
from fedmoe.views import (
    print_loss_table,
    print_status,
    print_verdicts,
    print_worker_summaries,
)

app = typer.Typer(
    help="Federated LoRA experts with a staleness-aware coordinator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:5000"
UrlOpt = Annotated[
    str,
    typer.Option(
        "--coordinator-url", envvar="FEDMOE_COORDINATOR_URL", help="Coordinator base URL."
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--auth-token", envvar="FEDMOE_AUTH_TOKEN", help="Bearer token.", show_default=False
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert", envvar="FEDMOE_CA_CERT", help="CA bundle to verify the coordinator's TLS."
    ),
]


def fail(message: str, code: int = 2) -> None:
    """Print an error for humans and exit."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _csv(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def _weights(value: str | None) -> dict[str, float] | None:
    if not value:
        return None
    weights = {}
    for item in _csv(value) or []:
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            fail(f"--gateway-weights expects name=number pairs, got {item!r}")
    return weights


@app.command()
def coordinator(
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [5000].")] = None,
    base_model: Annotated[str | None, typer.Option(help="HF id, local path or 'tiny'.")] = None,
    experts: Annotated[str | None, typer.Option(help="Comma-separated expert names.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Ledger + adapters (default: ./fedmoe_state).")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank [8].")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha [16].")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout [0].")] = None,
    lora_target_modules: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    lora_seed: Annotated[int | None, typer.Option(help="Initial adapter seed [0].")] = None,
    server_lr: Annotated[float | None, typer.Option(help="η of the update rule [1.0].")] = None,
    staleness: Annotated[
        str | None, typer.Option(help="inverse|constant|polynomial|hinge|exponential.")
    ] = None,
    staleness_a: Annotated[float | None, typer.Option(help="Parameter a of s(τ).")] = None,
    staleness_b: Annotated[int | None, typer.Option(help="Parameter b (hinge).")] = None,
    max_staleness: Annotated[int | None, typer.Option(help="Refuse staler updates (409).")] = None,
    merge_method: Annotated[str | None, typer.Option(help="Gateway merge: cat|linear|svd.")] = None,
    gateway_weights: Annotated[
        str | None, typer.Option(help="e.g. python_expert=2,sql_expert=1")
    ] = None,
    max_update_norm: Annotated[
        float | None, typer.Option(help="Bound on an update's norm.")
    ] = None,
    norm_policy: Annotated[str | None, typer.Option(help="clip|reject.")] = None,
    gateway_file_interval: Annotated[
        float | None, typer.Option(help="Seconds between gateway file writes [5].")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Upload size limit.")] = None,
    eager_gateway: Annotated[
        bool, typer.Option("--eager-gateway", help="Rebuild the gateway file after updates.")
    ] = False,
    signature_min_count: Annotated[
        int | None, typer.Option(help="Least examples behind a domain signature [100].")
    ] = None,
    router_fallback: Annotated[str | None, typer.Option(help="merged|mix [merged].")] = None,
    router_margin: Annotated[float | None, typer.Option(help="Router margin [0.1].")] = None,
    router_max_distance: Annotated[
        float | None, typer.Option(help="Router distance bound [2.5].")
    ] = None,
    auth_token: TokenOpt = None,
    tokens_file: Annotated[Path | None, typer.Option(help="JSON tokens file.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow no auth off loopback.")
    ] = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS key.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run the coordinator (HTTP API v1) until SIGINT/SIGTERM."""
    given: dict[str, Any] = {k: v for k, v in locals().items() if v is not None}
    from pydantic import ValidationError

    from fedmoe.api.server import serve
    from fedmoe.coordinator.errors import StateDirError
    from fedmoe.coordinator.settings import CoordinatorSettings

    given.pop("log_level")
    for key in ("experts", "lora_target_modules"):
        if key in given:
            given[key] = _csv(given[key])
    if "gateway_weights" in given:
        given["gateway_weights"] = _weights(given["gateway_weights"])
    if not insecure:
        given.pop("insecure")
    if not eager_gateway:
        given.pop("eager_gateway")
    setup_logging(log_level)
    try:
        settings = CoordinatorSettings(**given)
        serve(settings)
    except ValidationError as error:
        fail(
            "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
            )
        )
    except (StateDirError, ValueError, OSError) as error:
        fail(str(error))


@app.command()
def worker(
    worker_id: Annotated[str, typer.Option(help="Unique name of this worker.")],
    specialty: Annotated[str, typer.Option(help="The expert it trains, e.g. python_expert.")],
    dataset: Annotated[Path, typer.Option(help="Local JSONL training data.")],
    coordinator_url: UrlOpt = DEFAULT_URL,
    sync_interval: Annotated[float, typer.Option(help="Seconds between uploads.")] = 10.0,
    eval_dataset: Annotated[Path | None, typer.Option(help="Validation JSONL.")] = None,
    validation_fraction: Annotated[float, typer.Option(help="Held-out share.")] = 0.1,
    base_model: Annotated[str | None, typer.Option(help="Default: the coordinator's.")] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    lr: Annotated[float | None, typer.Option(help="AdamW lr [1e-2 tiny, 2e-4 else].")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    seed: Annotated[int, typer.Option(help="Data order seed.")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps.")] = None,
    max_seconds: Annotated[
        float | None, typer.Option(help="Stop after training N seconds.")
    ] = None,
    upload_dtype: Annotated[str, typer.Option(help="float32|bfloat16|float16.")] = "float32",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    slowdown: Annotated[float, typer.Option(help="Emulate a slower machine (x).")] = 1.0,
    signature_noise: Annotated[
        float, typer.Option(help="Gaussian noise std added to the domain signature.")
    ] = 0.0,
    summary_json: Annotated[Path | None, typer.Option(help="Write the summary here.")] = None,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Train one expert on local data and sync it every --sync-interval seconds."""
    import httpx
    import torch

    from fedmoe.config import TrainSettings
    from fedmoe.data import DataFormatError
    from fedmoe.worker.job import FatalSyncError, WorkerJob
    from fedmoe.worker.options import WorkerOptions
    from fedmoe.worker.trainer import TrainingDiverged

    setup_logging(log_level)
    if threads:
        torch.set_num_threads(threads)
    try:
        train = TrainSettings(
            learning_rate=lr,
            batch_size=batch_size,
            max_length=max_length,
            grad_accum=grad_accum,
            seed=seed,
        )
        options = WorkerOptions(
            coordinator_url=coordinator_url,
            worker_id=worker_id,
            specialty=specialty,
            dataset=dataset,
            eval_dataset=eval_dataset,
            validation_fraction=validation_fraction,
            sync_interval=sync_interval,
            base_model=base_model,
            device=device,
            train=train,
            max_steps=max_steps,
            max_seconds=max_seconds,
            upload_dtype=upload_dtype,
            auth_token=auth_token,
            ca_cert=ca_cert,
            slowdown=slowdown,
            signature_noise=signature_noise,
        )
    except ValueError as error:
        fail(str(error))
    job = WorkerJob(options)
    _stop_on_signals(job.request_stop)
    try:
        summary = job.run()
    except (DataFormatError, FatalSyncError, TrainingDiverged, OSError) as error:
        fail(str(error))
    except httpx.TransportError as error:
        fail(f"coordinator {coordinator_url} unreachable: {error}", code=1)
    if summary_json:
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
    coordinator_url: UrlOpt = DEFAULT_URL,
    auth_token: TokenOpt = None,
    ca_cert: CaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
) -> None:
    """Show experts, gateway and workers."""
    import httpx

    from fedmoe.client import ApiError, CoordinatorClient

    try:
        with CoordinatorClient(coordinator_url, token=auth_token, ca_cert=ca_cert) as client:
            data = client.status()
    except (httpx.HTTPError, ApiError) as error:
        fail(f"cannot read status from {coordinator_url}: {error}", code=1)
    if as_json:
        console.print_json(json.dumps(data))
        return
    print_status(console, data)


@app.command()
def gateway(
    coordinator_url: UrlOpt = DEFAULT_URL,
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
                f"gateway version {info['version']}, merge method "
                f"{info['merge_method']}, rank {info['lora_rank']}"
            )
            for name, version in info["expert_versions"].items():
                console.print(f"  {name}: version {version}, weight {info['weights'][name]:.3f}")
            print_router(console, info.get("router"))
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
    coordinator_url: UrlOpt = DEFAULT_URL,
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
    sys.exit(main())
