"""Tiny Hugging Face models with random weights (nothing downloaded), shared by the tests.

Each builder takes the depth and an optional device (``"meta"`` builds without
weights) and returns ``(model, example_inputs)``; the model is built before the example
token ids are drawn, so a seeded caller gets the same weights and inputs every time.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 97


def ids(batch: int = 2, seq: int = 7, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _build(cls, cfg, device):
    with torch.device(device or "cpu"):
        return cls(cfg)


def llama(layers: int, device: str | None = None, *, mask: bool = True):
    cfg = T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    model = _build(T.LlamaForCausalLM, cfg, device)
    inputs = {"input_ids": ids()}
    if mask:
        inputs["attention_mask"] = torch.ones(2, 7, dtype=torch.long)
    return model, inputs


def qwen2(layers: int, device: str | None = None):
    cfg = T.Qwen2Config(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return _build(T.Qwen2ForCausalLM, cfg, device), {"input_ids": ids()}


def gpt2(layers: int, device: str | None = None):
    cfg = T.GPT2Config(
        vocab_size=VOCAB, n_embd=40, n_layer=layers, n_head=4, n_positions=64, use_cache=False, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return _build(T.GPT2LMHeadModel, cfg, device), {"input_ids": ids()}


def neox(layers: int, device: str | None = None):
    cfg = T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=layers, num_attention_heads=4,
        use_cache=False, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return _build(T.GPTNeoXForCausalLM, cfg, device), {"input_ids": ids()}


def vit(layers: int, device: str | None = None):
    cfg = T.ViTConfig(
        hidden_size=40, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=72, image_size=16,
        patch_size=8,
    )  # fmt: skip
    return _build(T.ViTModel, cfg, device), {"pixel_values": torch.randn(2, 3, 16, 16)}


def t5(layers: int, device: str | None = None):
    cfg = T.T5Config(
        vocab_size=VOCAB, d_model=40, d_kv=10, d_ff=72, num_layers=layers, num_heads=4, use_cache=False,
    )  # fmt: skip
    return _build(T.T5Model, cfg, device), {"input_ids": ids(), "decoder_input_ids": ids(2, 5)}


def bert(layers: int, device: str | None = None):
    cfg = T.BertConfig(
        vocab_size=VOCAB, hidden_size=40, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=72,
    )  # fmt: skip
    return _build(T.BertModel, cfg, device), {"input_ids": ids()}
