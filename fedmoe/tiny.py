"""The built-in ``tiny`` base model preset.

A small Qwen2-architecture causal LM whose weights are generated from a fixed
seed and whose tokenizer is a byte-level BPE with no merges, so nothing is ever
downloaded. Tests and the demo use it; any real model is one ``--base-model``
flag away.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from fedmoe.presets import TINY_NAME as TINY_NAME  # the name, without transformers

logger = logging.getLogger(__name__)

TINY_SEED = 20240607
# Tied embeddings this large let a LoRA on the projections reach peaked next-token
# distributions; at 0.02 the logits of a 64-wide model cannot exceed about ±1.3.
EMBEDDING_STD = 0.1
WEIGHT_STD = 0.02
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's ChatML template, so `messages` data formats look like the real family's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return the tiny preset's tokenizer: one token per byte plus ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def tiny_config() -> Qwen2Config:
    """Return the tiny preset's Qwen2 configuration."""
    vocab_size = 256 + len(SPECIAL_TOKENS)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    )


def build_tiny_model() -> Qwen2ForCausalLM:
    """Return the tiny model with weights drawn from a fixed-seed generator.

    Each parameter is drawn in name order from one explicit generator rather
    than the global RNG, so the weights do not depend on what ran before.
    """
    config = tiny_config()
    model = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith(".bias"):
                parameter.zero_()
            else:
                std = EMBEDDING_STD if "embed_tokens" in name else WEIGHT_STD
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def export_tiny(directory: Path) -> Path:
    """Write the tiny preset as an ordinary HF model directory and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_model().save_pretrained(directory, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(directory)
    logger.info("wrote the tiny preset to %s", directory)
    return directory
