"""Inference on trained checkpoints: loading, sampling, generation, scoring, perplexity.

    from fusion_titan.inference import load_model, generate
    loaded = load_model("train_configs/debug_model.toml", "outputs/debug_model/checkpoint")
    result = generate(loaded.model, loaded.tokenizer.encode("def f("), max_new_tokens=32)

The lm-eval-harness adapter lives in `fusion_titan.inference.lm_eval_adapter` and is imported
only on demand (it needs the optional `lm-eval` package: pip install -e ".[eval]").
"""

from .generate import GenerationResult, generate
from .loading import LoadedModel, build_model, load_checkpoint, load_job_config, load_model
from .perplexity import PerplexityResult, evaluate_perplexity
from .sampling import sample_next_token, top_k_filter, top_p_filter
from .scoring import continuation_logprob, rolling_logprob, token_logprobs

__all__ = [
    "GenerationResult", "LoadedModel", "PerplexityResult", "build_model", "continuation_logprob",
    "evaluate_perplexity", "generate", "load_checkpoint", "load_job_config", "load_model",
    "rolling_logprob", "sample_next_token", "token_logprobs", "top_k_filter", "top_p_filter",
]
