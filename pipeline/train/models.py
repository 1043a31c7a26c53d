"""Load the student (special tokens, LoRA) and an online teacher; save a student as an HF dir.

Saving goes through torch's distributed state-dict API so the same call works for a plain
module, DDP and FSDP2 (where it gathers the full tensors; every rank must call it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..generate import check_model_dir, load_tokenizer  # noqa: F401 - re-exported


@dataclass(frozen=True)
class LoraOptions:
    r: int = 256
    alpha: int = 8
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("all-linear",)


def load_student(model_dir: str | Path, tokenizer: Any, *, weights_dir: str | Path | None = None,
                 lora: LoraOptions | None = None, adapter_dir: str | Path | None = None,
                 init_seed: int | None = None) -> nn.Module:
    """HF causal LM in train mode, fp32 master weights (autocast handles bf16 on GPU).

    `weights_dir` loads the weights of a checkpoint instead of `model_dir` (full fine-tuning);
    with LoRA the base always comes from `model_dir` and `adapter_dir` holds the trained adapter.
    `init_seed` builds the `model_dir` model from its config.json with fresh weights instead of
    its saved ones (a LoRA base too: the same seed gives the same base on resume).
    """
    src = weights_dir if (weights_dir is not None and lora is None) else model_dir
    if init_seed is not None and (weights_dir is None or lora is not None):
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.random.fork_rng(devices=[]):  # the run's own RNG stream is left as it was
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # an EOS token was added to the tokenizer
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        else:
            targets: Any = list(lora.target_modules)
            if targets == ["all-linear"]:
                targets = "all-linear"
            model = get_peft_model(model, LoraConfig(
                task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                lora_dropout=lora.dropout, target_modules=targets))
    model.train()
    return model


def load_teacher(model_dir: str | Path, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen teacher in eval mode, for online distillation."""
    check_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    return model


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (unchanged otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Un-sharded CPU state dict (a collective under FSDP2: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def gathered_state(student: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full weights of an FSDP2-sharded student (collective: every rank calls); None otherwise.

    Tied weights (GPT-2/Llama lm_head = embeddings) come back as separate entries; the second
    name is dropped so the saved dir looks like save_pretrained's own.
    """
    if not _is_sharded(student):
        return None
    state = full_state_dict(student)
    seen: set[int] = set()
    for name, p in student.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.add(id(p))
    return state


def write_student(student: nn.Module, tokenizer: Any, out_dir: str | Path,
                  state: dict[str, torch.Tensor] | None = None, merge_lora: bool = False) -> None:
    """Write the student as an HF dir (safetensors + tokenizer); LoRA: the adapter, or merged."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    if merge_lora and is_lora(student):
        import copy

        # merge into a copy so the adapter (and a run that continues) stays as it is
        copy.deepcopy(student).merge_and_unload().save_pretrained(str(out))
    else:
        student.save_pretrained(str(out), state_dict=state)
    tokenizer.save_pretrained(str(out))


def save_student(student: nn.Module, tokenizer: Any, out_dir: str | Path, *, is_main: bool,
                 merge_lora: bool = False) -> None:
    """gathered_state + write_student on the main rank (collective under FSDP2)."""
    state = gathered_state(student)
    if is_main:
        write_student(student, tokenizer, out_dir, state, merge_lora)


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
