"""Generate responses for eval prompts: transformers (default) or vLLM (when installed).

The paper's protocol: pure sampling (temperature 1, top-p 1, top-k 0) with
``no_repeat_ngram_size=6``, one run per seed. Prompts are tokenized the way training tokenized
them (``add_special_tokens=False``, no BOS, cut to the first ``max_prompt_len`` tokens).

Sampling is done with the Gumbel-max trick inside HF ``generate``: each prompt gets its own RNG
stream seeded from (seed, example id), and ``argmax(logits + Gumbel noise)`` is an exact draw from
``softmax(logits)``. HF's own ``do_sample=True`` draws all rows from one global stream, so a
prompt's sample would change with batch size, batch order or which other prompts share its batch;
here it depends only on (model, prompt, seed), up to float noise from padding. That is what lets
the stage sort prompts by length and lets different batch sizes reproduce the same file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor

from .tokenize import ensure_special_tokens

Decoding = Literal["sample", "greedy"]


class ModelLoadError(ValueError):
    """A model directory that cannot be used for generation; the message names it."""


def check_model_dir(model_dir: str | Path) -> Path:
    """Fail early (before any loading) when a model dir is missing or is not an HF model (or a
    LoRA adapter dir whose base model is here)."""
    p = Path(model_dir)
    if not p.is_dir():
        raise ModelLoadError(f"model dir {p} does not exist. Give a directory written by "
                             "save_pretrained (config.json + weights + tokenizer).")
    if adapter_base(p) is not None:
        return p
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model dir {p} has no config.json; is it a save_pretrained dir? "
                             "(for a training run, point at its checkpoint, e.g. RUN/final)")
    return p


def adapter_base(model_dir: Path) -> Path | None:
    """The base model dir of a LoRA adapter dir (peft's adapter_config.json, no config.json), as
    a LoRA run's checkpoints hold; None for a full model dir."""
    conf = model_dir / "adapter_config.json"
    if (model_dir / "config.json").is_file() or not conf.is_file():
        return None
    import json

    base = json.loads(conf.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ModelLoadError(f"LoRA adapter {model_dir}: its base model {base!r} "
                             "(adapter_config.json: base_model_name_or_path) is not a model dir "
                             "here; run from where the run was trained, or evaluate the run's "
                             "final/ (LoRA merged)")
    return Path(base)


def load_tokenizer(model_dir: str | Path, padding_side: str = "right") -> tuple[Any, list[str]]:
    """The model dir's tokenizer, with EOS/pad set when missing; returns (tokenizer, notes)."""
    d = check_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - many loader error types; the user needs the dir
        raise ModelLoadError(f"model dir {d}: cannot load its tokenizer ({type(e).__name__}: {e}); "
                             "save the tokenizer next to the model") from None
    notes = [f"{d}: {n}" for n in ensure_special_tokens(tok)]
    tok.padding_side = padding_side
    return tok, notes


def load_model(model_dir: str | Path, device: str = "cpu",
               dtype: str = "auto") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer padded on the left with a pad token) from a model dir."""
    p = check_model_dir(model_dir)
    tok, _ = load_tokenizer(p, padding_side="left")  # pad = EOS when missing; pads are masked
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    base = adapter_base(p)
    model = AutoModelForCausalLM.from_pretrained(str(base or p), dtype=torch_dtype)
    if base is not None:  # a LoRA checkpoint: the base plus the adapter, merged for speed
        from peft import PeftModel

        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))  # as training did (EOS/pad added)
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    model = model.to(device)
    model.eval()
    return model, tok


def row_seed(seed: int, example_id: str) -> int:
    """A 63-bit seed for one (run seed, example) pair, stable across machines and batchings."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GumbelSampler(LogitsProcessor):
    """Pure sampling as argmax over Gumbel-perturbed logits, one RNG stream per batch row.

    Runs after HF's processors (no_repeat_ngram sets banned tokens to -inf, which stay -inf).
    Every row draws one noise vector per step, finished rows included, so row i's stream depends
    only on its seed and the step number.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, V)
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s)
                               for s in self.seeds]
        if len(self.generators) != scores.shape[0]:
            raise RuntimeError(f"GumbelSampler has {len(self.generators)} seeds but the batch has "
                               f"{scores.shape[0]} rows")
        # float64 uniforms keep the Gumbel tail wide: tokens ~30 nats below the max stay reachable.
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device,
                                    dtype=torch.float64) for g in self.generators])  # (B, V)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
        return (scores.double() + gumbel).float()


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_len: int) -> list[list[int]]:
    """Training's prompt tokenization: no special tokens, first `max_prompt_len` tokens kept."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(x)[:max_prompt_len] for x in ids]


def _left_pad(batch: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def _decode_new(tokenizer: Any, new_ids: torch.Tensor) -> list[str]:
    """Decode generated tokens only: cut at the first EOS, drop special tokens, strip."""
    eos = tokenizer.eos_token_id
    out = []
    for row in new_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_transformers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    example_ids: Sequence[str],
    *,
    seed: int,
    decoding: Decoding = "sample",
    max_new_tokens: int = 256,
    max_prompt_len: int = 256,
    batch_size: int = 8,
    no_repeat_ngram_size: int = 6,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """One response per prompt, in input order. `on_batch(n)` is called after each batch of n."""
    if len(prompts) != len(example_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(example_ids)} example ids")
    torch.manual_seed(seed)  # nothing below draws from it; kept so any model-side RNG is seeded
    encoded = encode_prompts(tokenizer, prompts, max_prompt_len)
    # Longest first: similar lengths share a batch (less padding), and OOM shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    gen_cfg = GenerationConfig(
        do_sample=False,  # sampling happens in GumbelSampler; greedy when decoding == "greedy"
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size or None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, device)
        processors = []
        if decoding == "sample":
            processors.append(GumbelSampler([row_seed(seed, example_ids[i]) for i in idx]))
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                             logits_processor=processors)  # (B, width + new)
        for i, text in zip(idx, _decode_new(tokenizer, out[:, ids.shape[1]:])):
            texts[i] = text
        if on_batch is not None:
            on_batch(len(idx))
    return texts  # type: ignore[return-value]


# --------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def load_vllm(model_dir: str | Path, seed: int = 0, **llm_kwargs: Any) -> Any:
    """A `vllm.LLM` for one model dir (import guarded: the default tier never needs vLLM)."""
    p = check_model_dir(model_dir)
    try:
        from vllm import LLM
    except ImportError:
        raise ModelLoadError("--backend vllm needs vLLM: pip install 'dskd[vllm]' "
                             "(or use --backend transformers)") from None
    return LLM(model=str(p), seed=seed, **llm_kwargs)


def generate_vllm(
    llm: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    example_ids: Sequence[str],
    *,
    seed: int,
    decoding: Decoding = "sample",
    max_new_tokens: int = 256,
    max_prompt_len: int = 256,
) -> list[str]:
    """Same contract as `generate_transformers`, via `llm.generate` with per-request seeds.

    vLLM has no `no_repeat_ngram_size`; this path samples without it (the stage records that in
    results.json). Prompts go in as token ids so tokenization matches training exactly.
    """
    from vllm import SamplingParams

    encoded = encode_prompts(tokenizer, prompts, max_prompt_len)
    greedy = decoding == "greedy"
    params = [
        SamplingParams(
            temperature=0.0 if greedy else 1.0,
            top_p=1.0,
            top_k=-1,  # disabled (newer vLLM also accepts 0; older rejects it)
            seed=None if greedy else row_seed(seed, eid),
            max_tokens=max_new_tokens,
            skip_special_tokens=True,
        )
        for eid in example_ids
    ]
    requests = [{"prompt_token_ids": ids} for ids in encoded]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outputs]
