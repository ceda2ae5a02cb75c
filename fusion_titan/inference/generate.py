"""Text generation: prefill the prompt into a ModelCache, then decode token by token.

The cache (fusion_titan/model/decoding.py) holds, per attention block, the MLA compressed latent
+ rope key of the kept tokens (at most `sliding_window` of them when the model has a window), and
per recurrent block the Gated DeltaNet (or Mamba-2) conv + recurrent state. Each decode step
feeds only the new token, which is exactly equivalent to re-running the full forward over the
whole sequence (tests/test_generation.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.decoding import cache_nbytes, new_model_cache
from .sampling import sample_next_token


@dataclass
class GenerationResult:
    tokens: torch.Tensor            # [B, P + n]: prompt, then generated tokens (EOS-padded rows)
    new_tokens: list[list[int]]     # per row, the generated ids (through EOS / the stop)
    prompt_len: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0           # forwards after the prefill (one token per row each)
    cache_bytes: int = 0            # bytes held by the cache at the end
    finished: list[bool] = field(default_factory=list)  # stopped by EOS / stop rule

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_len * self.tokens.shape[0]
        return n / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.decode_steps * self.tokens.shape[0]
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model,
    prompt,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    prefill_chunk: int = 0,
    cache_dtype: torch.dtype | None = None,
) -> GenerationResult:
    """Continue `prompt` (ids: list, [P] or [B, P] tensor; rows of equal length) by up to
    `max_new_tokens` tokens.

    temperature 0 = greedy; otherwise temperature / top_k / top_p sampling drawn from
    `generator` (or a fresh one seeded with `seed`). A row finishes when it emits `eos_id`
    (kept in its output) or when `stop(row_new_ids)` returns True; generation ends when all rows
    have finished or after max_new_tokens. prefill_chunk > 0 feeds the prompt in chunks of that
    many tokens (bounds the attention scores of a long prompt; same result).
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    batch, prompt_len = prompt.shape
    if prompt_len < 1:
        raise ValueError("generate needs a non-empty prompt")
    limit = model.model_args.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len ({limit}, the rope table's length); shorten them or raise max_seq_len"
        )
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    was_training = model.training
    model.eval()
    new: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    result = GenerationResult(tokens=prompt, new_tokens=new, prompt_len=prompt_len, finished=finished)
    try:
        cache = new_model_cache(model, batch, dtype=cache_dtype)
        _sync(device)
        t0 = time.perf_counter()
        step = prefill_chunk if prefill_chunk > 0 else prompt_len
        for start in range(0, prompt_len, step):
            logits = model(prompt[:, start:start + step], cache=cache)
        _sync(device)
        result.prefill_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            nxt = sample_next_token(logits[:, -1], temperature, top_p, top_k, generator)
            ids = nxt.squeeze(1).tolist()
            for row, tok in enumerate(ids):
                if finished[row]:
                    continue
                new[row].append(tok)
                if (eos_id is not None and tok == eos_id) or (stop is not None and stop(new[row])):
                    finished[row] = True
            if all(finished) or i + 1 == max_new_tokens:
                break
            logits = model(nxt, cache=cache)
            result.decode_steps += 1
        _sync(device)
        result.decode_seconds = time.perf_counter() - t0
        result.cache_bytes = cache_nbytes(cache)
    finally:
        model.train(was_training)

    width = max((len(r) for r in new), default=0)
    pad = eos_id if eos_id is not None else 0
    rows = [r + [pad] * (width - len(r)) for r in new]
    generated = torch.tensor(rows, dtype=torch.long, device=device).view(batch, width)
    result.tokens = torch.cat([prompt, generated], dim=1)
    return result
