"""``fedmoe serve`` through the official ``openai`` client, on a live coordinator over HTTP.

Experts are set deterministically (one seeded delta each, uploaded as a worker would);
every answer is checked against the same adapter loaded with plain peft.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

from fedmoe.adapters import write_peft_dir
from fedmoe.aggregate import merge_cat
from fedmoe.cli import app
from fedmoe.client import CoordinatorClient
from fedmoe.config import LoraSettings
from fedmoe.export import fetch_adapter_dir, generate, load_with_adapter
from fedmoe.featurizer import FeaturizerSettings, featurize
from fedmoe.modeling import load_base_model
from fedmoe.routing import router_from_payload
from fedmoe.serve.router import BaseView
from fedmoe.serve.settings import ServeSettings
from fedmoe.serve.vllm import VLLM_RANKS, export_for_vllm
from fedmoe.signature import DomainSignature
from tests.serve_helpers import (
    EXPERTS,
    LiveServe,
    held_out_prompts,
    push_expert,
    sign_experts,
    start_serve,
)

PROMPTS = {
    "python_expert": "def add(a, b):",
    "sql_expert": "SELECT name FROM users WHERE",
    "docs_expert": "## Install",
    "gateway": "Hello",
}


@pytest.fixture(scope="module")
def stack(module_coordinator_factory: Any) -> Iterator[dict[str, Any]]:
    live = module_coordinator_factory()
    with live.client() as http:
        for seed, expert in enumerate(EXPERTS, start=1):
            push_expert(http, expert, seed)
    sign_experts(live.url, load_base_model("tiny", device="cpu"))
    serve = start_serve(coordinator_url=live.url, reload_interval=0.2)
    try:
        yield {"live": live, "serve": serve, "client": _openai(serve)}
    finally:
        serve.stop()


def _openai(serve: LiveServe, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key=key, max_retries=0, timeout=60)


def _reference(live: Any, expert: str, prompt: str, tmp: Path, max_new_tokens: int) -> str:
    """Greedy text of ``expert`` loaded from its PEFT directory with plain peft."""
    with CoordinatorClient(live.url) as client:
        fetch_adapter_dir(client, tmp / expert, expert=None if expert == "gateway" else expert)
    model, tokenizer = load_with_adapter("tiny", tmp / expert, device="cpu")
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)


def test_models_lists_experts_gateway_and_auto(stack: dict[str, Any]) -> None:
    models = {m.id: m for m in stack["client"].models.list().data}
    assert set(models) == {*EXPERTS, "gateway", "fedmoe-auto"}
    for expert in EXPERTS:
        assert models[expert].model_extra["version"] == 1
        assert models[expert].model_extra["kind"] == "expert"
    assert models["gateway"].model_extra["lora_rank"] == 3 * 8  # cat of three rank-8 experts


@pytest.mark.parametrize("expert", ["sql_expert", "gateway"])
def test_completion_is_the_peft_adapters_greedy_answer(
    stack: dict[str, Any], expert: str, tmp_path: Path
) -> None:
    raw = stack["client"].completions.with_raw_response.create(
        model=expert, prompt=PROMPTS[expert], max_tokens=12, temperature=0
    )
    answer = raw.parse()
    assert answer.choices[0].text == _reference(
        stack["live"], expert, PROMPTS[expert], tmp_path, 12
    )
    assert raw.headers["x-fedmoe-expert"] == expert
    assert answer.model_extra["fedmoe"]["expert"] == expert
    usage = answer.usage
    assert usage.prompt_tokens == len(PROMPTS[expert].encode())  # tiny: a token per byte
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_experts_answer_differently(stack: dict[str, Any]) -> None:
    texts = {
        expert: stack["client"]
        .completions.create(model=expert, prompt="x = ", max_tokens=8, temperature=0)
        .choices[0]
        .text
        for expert in EXPERTS
    }
    assert len(set(texts.values())) == 3, texts


def test_chat_uses_the_chat_template_and_streams_the_same_text(stack: dict[str, Any]) -> None:
    client = stack["client"]
    messages = [{"role": "user", "content": "List the tables."}]
    answer = client.chat.completions.create(
        model="docs_expert", messages=messages, max_tokens=10, temperature=0
    )
    tokenizer = stack["serve"].service.registry.tokenizer
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.endswith("<|im_start|>assistant\n")
    assert answer.usage.prompt_tokens == len(tokenizer(template)["input_ids"])
    assert answer.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="docs_expert",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [answer.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert all(c.model_extra["fedmoe"]["expert"] == "docs_expert" for c in chunks if c.choices)


def test_completion_stream_is_server_sent_events_ending_with_done(stack: dict[str, Any]) -> None:
    body = {"model": "sql_expert", "prompt": "SELECT", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{stack['serve'].url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-fedmoe-expert"] == "sql_expert"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_stop_sequence_cuts_the_answer(stack: dict[str, Any]) -> None:
    client = stack["client"]
    full = client.completions.create(
        model="python_expert", prompt=PROMPTS["python_expert"], max_tokens=16, temperature=0
    ).choices[0]
    stop = full.text[4:6]
    assert stop, full.text
    cut = client.completions.create(
        model="python_expert",
        prompt=PROMPTS["python_expert"],
        max_tokens=16,
        temperature=0,
        stop=[stop],
    ).choices[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_openai_style_errors(stack: dict[str, Any]) -> None:
    client = stack["client"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no_such_expert", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    assert "no_such_expert" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="sql_expert", prompt="x", max_tokens=100_000)
    assert too_long.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model="sql_expert", prompt="x", max_tokens=2, n=2)
    assert several.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as malformed:
        client.chat.completions.create(model="sql_expert", messages=[], max_tokens=2)
    assert malformed.value.body["param"] == "messages"
    response = httpx.post(f"{stack['serve'].url}/v1/completions", content=b"{not json")
    assert response.status_code == 422
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_auto_routes_each_domain_to_its_expert(stack: dict[str, Any]) -> None:
    client, routed = stack["client"], {}
    for expert in EXPERTS:
        for prompt in held_out_prompts(expert, 4):
            raw = client.completions.with_raw_response.create(
                model="fedmoe-auto", prompt=prompt, max_tokens=4, temperature=0
            )
            info = raw.parse().model_extra["fedmoe"]
            assert raw.headers["x-fedmoe-expert"] == info["expert"]
            assert set(info["scores"]) == set(EXPERTS)
            header = dict(item.split("=") for item in raw.headers["x-fedmoe-routing"].split(","))
            assert set(header) == set(EXPERTS)
            routed[prompt] = (expert, info["expert"], raw.parse().choices[0].text)
    correct = sum(want == got for want, got, _ in routed.values())
    assert correct >= 0.9 * len(routed), routed
    prompt, (_, served_by, text) = next(iter(routed.items()))
    direct = client.completions.create(model=served_by, prompt=prompt, max_tokens=4, temperature=0)
    assert direct.choices[0].text == text


def test_router_features_come_from_the_base_model_alone(stack: dict[str, Any]) -> None:
    service, settings = stack["serve"].service, FeaturizerSettings()
    texts = ["SELECT id FROM t;", "def f(xs): return xs", "## Install"]
    plain = load_base_model("tiny", device="cpu")
    expected = featurize(plain.model, plain.tokenizer, texts, settings)
    model = BaseView(service.registry.require_model())  # three experts and a gateway loaded
    served = service.run_on_engine(
        lambda: featurize(model, service.registry.tokenizer, texts, settings)
    )
    assert torch.allclose(served, expected, atol=1e-5)


def test_without_the_gateway_a_merged_fallback_goes_to_the_best_expert(
    stack: dict[str, Any],
) -> None:
    serve = start_serve(coordinator_url=stack["live"].url, gateway=False, reload_interval=60)
    try:
        client = _openai(serve)
        assert {m.id for m in client.models.list().data} == {*EXPERTS, "fedmoe-auto"}
        serve.service.router_options = {"fallback": "merged", "margin": 1e9}
        serve.service.reload()
        answer = client.completions.create(
            model="fedmoe-auto", prompt="SELECT id FROM t", max_tokens=2, temperature=0
        )
        info = answer.model_extra["fedmoe"]
        assert info["fallback"] is True
        assert info["expert"] == max(info["scores"], key=info["scores"].get)
    finally:
        serve.stop()


def test_concurrent_requests_share_one_mixed_adapter_batch(stack: dict[str, Any]) -> None:
    client, engine = stack["client"], stack["serve"].service.engine
    models = [*EXPERTS, "gateway"]

    def ask(model: str) -> tuple[str, int]:
        answer = client.completions.create(
            model=model, prompt=PROMPTS[model], max_tokens=12, temperature=0
        )
        return answer.choices[0].text, answer.model_extra["fedmoe"]["batch_size"]

    alone = {model: ask(model) for model in models}
    assert all(size == 1 for _, size in alone.values())
    engine.batch_wait = 1.0  # long enough for all four to arrive, however loaded the machine
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            together = dict(zip(models, pool.map(ask, models)))
    finally:
        engine.batch_wait = ServeSettings.model_fields["batch_wait_ms"].default / 1000
    assert {size for _, size in together.values()} == {len(models)}
    assert {m: text for m, (text, _) in together.items()} == {
        m: text for m, (text, _) in alone.items()
    }


def test_new_expert_version_is_hot_reloaded_without_dropping_a_stream(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    client, live = stack["client"], stack["live"]
    prompt = PROMPTS["python_expert"]
    before = client.completions.create(
        model="python_expert", prompt=prompt, max_tokens=10, temperature=0
    )
    stream = client.completions.create(
        model="python_expert", prompt=prompt, max_tokens=300, temperature=0, stream=True
    )
    first = next(iter(stream))  # the stream is running on the old version
    with live.client() as http:
        new_version = push_expert(http, "python_expert", seed=99)
    deadline = time.monotonic() + 20
    while _version(client, "python_expert") != new_version:
        assert time.monotonic() < deadline, "the new version was never loaded"
        time.sleep(0.05)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in {"stop", "length"}
    assert first.model_extra["fedmoe"]["version"] == new_version - 1
    after = client.completions.create(
        model="python_expert", prompt=prompt, max_tokens=10, temperature=0
    )
    assert after.model_extra["fedmoe"]["version"] == new_version
    assert after.choices[0].text == _reference(live, "python_expert", prompt, tmp_path, 10)
    assert after.choices[0].text != before.choices[0].text


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def _version(client: openai.OpenAI, model: str) -> int:
    return {m.id: m.model_extra["version"] for m in client.models.list().data}[model]


# --- export for vLLM, and serving the export offline with auth ------------------------------


@pytest.fixture(scope="module")
def exported(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("vllm")
    with CoordinatorClient(stack["live"].url) as client:
        manifest = export_for_vllm(client, directory)
    return {"dir": directory, "manifest": manifest}


def test_export_writes_vllm_ready_adapters_router_and_command(exported: dict[str, Any]) -> None:
    manifest, directory = exported["manifest"], exported["dir"]
    assert set(manifest["adapters"]) == {*EXPERTS, "gateway"}
    assert all(info["rank"] in VLLM_RANKS for info in manifest["adapters"].values())
    assert manifest["adapters"]["gateway"]["original_rank"] == 24
    assert manifest["max_lora_rank"] == 32
    for name in (*EXPERTS, "gateway"):
        assert f"{name}={directory / name}" in manifest["command"]
    assert "--enable-lora" in manifest["command"] and "--max-lora-rank 32" in manifest["command"]
    assert json.loads((directory / "vllm.json").read_text()) == manifest
    assert "--max-lora-rank" in (directory / "README.md").read_text()
    payload = json.loads((directory / "router.json").read_text())
    assert router_from_payload(payload) is not None
    for expert in EXPERTS:
        signature = DomainSignature.from_safetensors(
            (directory / "signatures" / f"{expert}.safetensors").read_bytes()
        )
        assert signature.count == 100
    # the base model is written out, loadable by transformers (and vLLM)
    assert (directory / "base_model" / "config.json").exists()


def test_exported_adapters_load_with_peft_and_padding_changes_nothing(
    stack: dict[str, Any], exported: dict[str, Any], tmp_path: Path
) -> None:
    with CoordinatorClient(stack["live"].url) as client:
        fetch_adapter_dir(client, tmp_path / "gateway")
    ids = torch.tensor([list(b"SELECT * FROM t")])
    logits = {}
    for label, path in (
        ("padded", exported["dir"] / "gateway"),
        ("original", tmp_path / "gateway"),
    ):
        model, _ = load_with_adapter("tiny", path, device="cpu")
        assert model.peft_config["default"].r == (32 if label == "padded" else 24)
        with torch.no_grad():
            logits[label] = model(input_ids=ids).logits
    assert torch.allclose(logits["padded"], logits["original"], atol=1e-5)
    for expert in EXPERTS:
        model, _ = load_with_adapter("tiny", exported["dir"] / expert, device="cpu")
        assert model.peft_config["default"].r == 8


def test_offline_serving_of_the_export_with_auth(
    stack: dict[str, Any], exported: dict[str, Any]
) -> None:
    token = "offline-serving-token-0123456789"
    serve = start_serve(adapters_dir=exported["dir"], auth_token=token)
    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            _openai(serve, key="wrong-token-0123456789").models.list()
        assert refused.value.body["type"] == "authentication_error"
        assert httpx.get(f"{serve.url}/v1/models").status_code == 401
        client = _openai(serve, key=token)
        models = {m.id: m.model_extra["version"] for m in client.models.list().data}
        online = {m.id: m.model_extra["version"] for m in stack["client"].models.list().data}
        assert models == online
        prompt = held_out_prompts("sql_expert", 1)[0]
        for model in ("sql_expert", "gateway", "fedmoe-auto"):
            here = client.completions.create(
                model=model, prompt=prompt, max_tokens=8, temperature=0
            )
            there = stack["client"].completions.create(
                model=model, prompt=prompt, max_tokens=8, temperature=0
            )
            assert here.choices[0].text == there.choices[0].text
            assert here.model_extra["fedmoe"] == there.model_extra["fedmoe"]
    finally:
        serve.stop()


def test_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0"):
        ServeSettings(host="0.0.0.0", adapters_dir=tmp_path)
    assert ServeSettings(host="0.0.0.0", adapters_dir=tmp_path, insecure=True).host == "0.0.0.0"
    assert ServeSettings(adapters_dir=tmp_path, auth_token="t" * 20).host == "0.0.0.0"
    assert ServeSettings(adapters_dir=tmp_path).host == "127.0.0.1"
    result = CliRunner().invoke(app, ["serve", "--adapters-dir", str(tmp_path), "--host", "::"])
    assert result.exit_code == 2 and "refusing to listen" in result.output


def test_sampling_with_a_seed_is_repeatable(stack: dict[str, Any]) -> None:
    def sample(seed: int) -> str:
        answer = stack["client"].completions.create(
            model="sql_expert",
            prompt="SELECT",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
        )
        return answer.choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(5), sample(6), sample(7)}) > 1


def test_mix_fallback_serves_the_weighted_cat_of_the_top_experts(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    service = stack["serve"].service
    # as `fedmoe serve --router-fallback mix`, with no clear winner ever and a soft mix
    service.router_options = {"fallback": "mix", "margin": 1e9, "temperature": 1.0}
    try:
        _wait_for(lambda: service.router is not None and service.router.router.fallback == "mix")
        prompt = held_out_prompts("sql_expert", 1)[0]
        answer = stack["client"].completions.create(
            model="fedmoe-auto", prompt=prompt, max_tokens=8, temperature=0
        )
    finally:
        service.router_options = {}
        _wait_for(lambda: service.router is not None and service.router.router.fallback != "mix")
    info = answer.model_extra["fedmoe"]
    assert info["fallback"] is True and info["expert"].startswith("mix-")
    parts = info["expert"].removeprefix("mix-").split("-")  # <expert>-<percent>-...
    weights = {name: int(percent) / 100 for name, percent in zip(parts[::2], parts[1::2])}
    assert len(weights) == 2 and set(weights) <= set(EXPERTS)  # top_k = 2
    with CoordinatorClient(stack["live"].url) as client:
        schema = client.schema()
        shapes = {k: tuple(v) for k, v in schema.tensors.items()}
        states = [client.expert_adapter(name, shapes)[1] for name in weights]
    lora = LoraSettings.from_dict(schema.lora_config.model_dump())
    mixed = merge_cat(states, [w / sum(weights.values()) for w in weights.values()])
    write_peft_dir(
        mixed, lora, tmp_path / "mix", base_model="tiny", rank=2 * lora.rank, alpha=2 * lora.alpha
    )
    model, tokenizer = load_with_adapter("tiny", tmp_path / "mix", device="cpu")
    assert answer.choices[0].text == generate(model, tokenizer, prompt, max_new_tokens=8)
