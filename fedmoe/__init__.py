"""FedMoE: federated LoRA fine-tuning of domain experts with a merged gateway model."""

__version__ = "0.1.0"
