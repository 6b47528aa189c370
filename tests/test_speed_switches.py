"""Each training speed switch keeps the loss and the LoRA gradients of the plain loop."""

from __future__ import annotations

import pytest
import torch

from fedmoe.batching import IGNORE_INDEX, collate, count_trainable_tokens, tokenize_examples
from fedmoe.config import LoraSettings, TrainSettings
from fedmoe.data import load_examples
from fedmoe.demo_data import write_demo_datasets
from fedmoe.modeling import attach_lora, load_base_model, lora_parameters
from fedmoe.worker.speed import SpeedPlan, SpeedSetupError, apply_model_switches, resolve_plan
from fedmoe.worker.train_step import CausalLMLoss, chunked_cross_entropy, make_batch, pack

pytestmark = pytest.mark.heavy(17)  # run early (tests/conftest.py)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    paths = write_demo_datasets(tmp_path_factory.mktemp("d"), train_count=6, validation_count=1)
    tokenizer = load_base_model("tiny", device="cpu").tokenizer
    items = tokenize_examples(load_examples(paths["sql_expert"][0]), tokenizer, max_length=256)
    return items[:3], tokenizer.pad_token_id


@pytest.fixture(scope="module")
def reference(examples):
    return _loss_and_grads(*examples, SpeedPlan())


def _loss_and_grads(examples, pad, plan: SpeedPlan, backend: str = "inductor"):
    model = attach_lora(load_base_model("tiny", device="cpu").model, LoraSettings(dropout=0.0))
    model.train()
    apply_model_switches(model, plan, compile_backend=backend)
    batch = make_batch(examples, pad, packed=plan.packing)
    loss = CausalLMLoss(model, plan.cross_entropy)(**batch) / count_trainable_tokens(batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in lora_parameters(model).items()}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("plan", "backend"),
    [
        (SpeedPlan(packing=True), "inductor"),
        (SpeedPlan(cross_entropy="chunked"), "inductor"),
        (SpeedPlan(gradient_checkpointing=True), "inductor"),
        (SpeedPlan(torch_compile=True), "eager"),  # dynamo's graphs; inductor: GPU script
        (SpeedPlan(True, "chunked", True), "inductor"),
    ],
    ids=["packing", "chunked", "checkpointing", "compile", "all"],
)
def test_switch_keeps_loss_and_gradients(examples, reference, plan, backend) -> None:
    items, pad = examples
    reference_loss, reference = reference
    loss, grads = _loss_and_grads(items, pad, plan, backend)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in reference.values())
    for key, grad in reference.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)


def test_packed_loss_equals_unpacked_loss_per_example(examples) -> None:
    items, pad = examples
    model = load_base_model("tiny", device="cpu").model
    packed = pack(items)
    assert packed["input_ids"].shape[0] == 1  # one row, no padding
    assert packed["input_ids"].shape[1] == sum(len(i.input_ids) for i in items)
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
    start = 0
    for item in items:
        end = start + len(item.input_ids)
        assert packed["position_ids"][0, start] == 0
        assert packed["labels"][0, start] == IGNORE_INDEX  # never predicted across examples
        alone = collate([item], pad)
        with torch.no_grad():
            own = model(**alone).logits[0]
        torch.testing.assert_close(logits[0, start:end], own, rtol=1e-4, atol=1e-5)
        start = end


def test_chunked_cross_entropy_matches_full_logits_in_small_chunks() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    full = torch.nn.functional.cross_entropy(
        head(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    (full_grad,) = torch.autograd.grad(full, hidden)
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_tokens=3)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grad, full_grad)


def test_auto_takes_the_device_default_and_liger_needs_the_package() -> None:
    from fedmoe.worker.speed import DEVICE_DEFAULTS, liger_available

    assert resolve_plan(TrainSettings(), torch.device("cpu")) == DEVICE_DEFAULTS["cpu"]
    flash = resolve_plan(TrainSettings(), torch.device("cpu"), "flash_attention_2")
    assert flash.packing  # packing pays with a variable-length attention kernel
    explicit = TrainSettings(packing="off", cross_entropy="full", torch_compile="on")
    assert resolve_plan(explicit, torch.device("cpu")) == SpeedPlan(torch_compile=True)
    if not liger_available():
        with pytest.raises(SpeedSetupError, match="Liger Kernel"):
            resolve_plan(TrainSettings(cross_entropy="liger"), torch.device("cpu"))


def test_load_in_4bit_says_what_is_missing_here() -> None:
    from fedmoe.worker.qlora import load_quantized_base

    # No GPU in CI: the refusal names bitsandbytes or the CUDA device, whichever is missing.
    with pytest.raises(SpeedSetupError, match=r"--load-in-4bit needs (bitsandbytes|a CUDA)"):
        load_quantized_base("Qwen/Qwen2.5-0.5B", device="cpu")
