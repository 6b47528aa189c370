"""The worker's adapter slot: a PEFT model's LoRA weights, snapshotted and rebased in place.

``copy_into`` is one copy (device to host, and a cast when the weights are not float32)
per tensor into the ``Syncer``'s reused host buffers; ``rebase`` copies ``since`` and
``newest`` to the weights' device and applies (w − since) + newest there, in float32
(see ``fedmoe.worker.slots``). Half the tensors go to a helper thread each time.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from fedmoe.aggregate import AdapterState
from fedmoe.modeling import adapter_state, load_adapter_state, lora_parameters
from fedmoe.worker.slots import check_keys, each_tensor, rebase_


class PeftAdapterSlot:
    """``InPlaceSlot`` over a PEFT model's LoRA parameters (on any device, any dtype)."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def state(self) -> AdapterState:
        """A float32 CPU copy of the LoRA weights."""
        return adapter_state(self.model)

    def load(self, state: AdapterState) -> None:
        """Copy ``state`` into the LoRA weights in place."""
        load_adapter_state(self.model, state)

    @torch.no_grad()
    def copy_into(self, out: AdapterState) -> None:
        """Copy the LoRA weights into ``out`` (one device-to-host copy and cast each)."""
        parameters = lora_parameters(self.model)
        check_keys(parameters, out)
        each_tensor(parameters, lambda key: out[key].copy_(parameters[key].detach()))

    def rebase(self, since: AdapterState, newest: AdapterState) -> None:
        """Every LoRA weight ← (weight − since) + newest, on the weight's device."""
        parameters = lora_parameters(self.model)
        check_keys(parameters, since)
        each_tensor(parameters, lambda key: _rebase(parameters[key], since[key], newest[key]))


@torch.no_grad()  # (a helper thread starts with grad mode on: the decorator sets it there)
def _rebase(parameter: torch.Tensor, since: torch.Tensor, newest: torch.Tensor) -> None:
    device = parameter.device
    was, now = since.to(device), newest.to(device)
    if parameter.dtype == torch.float32:
        rebase_(parameter, was, now)
    else:  # the rule in float32, then one rounding to the weight's dtype
        parameter.copy_(rebase_(parameter.detach().float(), was, now))
