"""lm-eval-harness adapter: `--model fusion_titan` (needs the optional `lm-eval` package).

Importing this module registers the model name "fusion_titan" with lm_eval's registry; the
harness's own CLI does not discover models from other packages, so run it through
`python scripts/lm_eval.py ...` (same arguments as `lm_eval`), or import this module before
calling lm_eval.simple_evaluate. Model arguments (`--model_args key=value,...`):

    config        training TOML (required), e.g. train_configs/debug_model.toml
    checkpoint    DCP step folder / checkpoint folder / torch.save file (none = random init)
    overrides     extra `--section.key value` config overrides, space separated
    dtype         float32 (default) | bfloat16
    max_length    tokens per forward (default: the model's max_seq_len)
    max_gen_toks  default generation budget (256)
    batch_size, device   as lm_eval passes them

Scoring follows lm_eval's TemplateLM conventions (context's trailing spaces move to the
continuation, an empty context is replaced by EOS); the log-probs come from
fusion_titan.inference.scoring, generation from fusion_titan.inference.generate (greedy unless
the task asks for do_sample / temperature).
"""

from __future__ import annotations

import shlex

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generate import generate
from .loading import load_model
from .scoring import continuation_logprob_batch, rolling_logprob


@register_model("fusion_titan")
class FusionLM(TemplateLM):
    def __init__(self, config: str | None = None, checkpoint: str | None = None,
                 overrides: str = "", dtype: str = "float32", device: str | None = None,
                 batch_size: int | str | None = 1, max_length: int | None = None,
                 max_gen_toks: int = 256, model=None, tokenizer=None, **unused):
        super().__init__()
        if model is None:
            if config is None:
                raise ValueError("fusion_titan needs model_args config=<training TOML>")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_model(config, checkpoint, overrides=shlex.split(overrides or ""),
                                device=device, dtype=dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size or "1").isdigit() else 1  # "auto" -> 1
        self.max_length = int(max_length or model.model_args.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # --- tokenization (TemplateLM) -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name)

    # --- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids) -> (logprob, greedy)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first, so a batch's rows have similar lengths (less right padding).
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                      desc="loglikelihood"):
            idx = order[s:s + self.batch_size]
            pairs = [(requests[i][1], requests[i][2]) for i in idx]
            for i, res in zip(idx, continuation_logprob_batch(self.model, pairs, self.max_length)):
                results[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            total = rolling_logprob(self.model, self.tok_encode(text), self.prefix_token_id,
                                    self.max_length)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate_one(self, context: str, kwargs: dict) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text not in until:
            until.append(eos_text)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(kwargs.pop("top_k", 0) or 0)
        seed = kwargs.pop("seed", None)

        # Keep the prompt's end and leave room for the answer within max_length.
        max_new = max(1, min(max_new, self.max_length - 1))
        ids = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new):]

        def hit_stop(new_ids: list[int]) -> bool:
            text = self.tok_decode(new_ids)
            return any(s and s in text for s in until)

        result = generate(self.model, ids, max_new, temperature=temperature, top_p=top_p,
                          top_k=top_k, eos_id=self.eot_token_id, seed=seed, stop=hit_stop)
        text = self.tok_decode(result.new_tokens[0])
        for s in until:  # cut at the first stop string (lm_eval convention)
            if s:
                text = text.split(s)[0]
        return text
