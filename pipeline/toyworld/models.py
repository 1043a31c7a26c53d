"""Tiny randomly initialised causal LMs, saved as HF model dirs with their tokenizer beside them.

Llama models keep head_dim = 64 because vLLM's CPU attention only accepts a few head sizes;
GPT-2 models use 64 too for the same reason. vocab_size is always `len(tokenizer)`, and the
tokenizer's eos/pad/bos ids go into both `config.json` and `generation_config.json`, so
`generate()` stops on eos and pads with pad without any caller knowing the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
)

HEAD_DIM = 64


@dataclass(frozen=True)
class ModelSpec:
    arch: Literal["llama", "gpt2"]
    hidden: int  # D; a multiple of HEAD_DIM
    layers: int
    intermediate: int  # MLP width
    tie_embeddings: bool = False
    max_positions: int = 512

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM


def make_config(spec: ModelSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    if spec.hidden % HEAD_DIM:
        raise ValueError(f"hidden={spec.hidden} must be a multiple of head_dim={HEAD_DIM}")
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            head_dim=HEAD_DIM,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=spec.tie_embeddings,
            dtype="float32",
            **ids,
        )
    if spec.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.intermediate,
            n_positions=spec.max_positions,
            tie_word_embeddings=spec.tie_embeddings,
            # No dropout, like the Llama models: train() and eval() forwards then agree, which
            # keeps live-vs-cached teacher comparisons and pinned-loss tests exact.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            dtype="float32",
            **ids,
        )
    raise ValueError(f"unknown arch {spec.arch!r}; expected 'llama' or 'gpt2'")


def build_model(spec: ModelSpec, tokenizer_dir: Path, out_dir: Path, seed: int) -> int:
    """Random-init a model for `tokenizer_dir`'s vocab under `seed`; save model + tokenizer.

    Returns the parameter count (tied embeddings counted once).
    """
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = make_config(spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
