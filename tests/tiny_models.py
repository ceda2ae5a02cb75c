"""A tiny float64 model of the debug flavor's shapes for the decoding / generation tests, and one
training step that reports what the wrapped-vs-plain model tests (AC, compile) compare."""

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.model.moe import DeepSeekMoE


def tiny_model(seed: int = 0, **overrides) -> FusionModel:
    args = FLAVORS["debugmodel"].replace(vocab_size=256, n_layers=6, max_seq_len=64, **overrides)
    torch.manual_seed(seed)
    model = FusionModel(args)
    model.init_weights()
    return model.double().eval()


def loss_grads_and_load(model: FusionModel):
    """One seeded forward + backward on vocabulary-256 tokens: (loss, {parameter name: grad} with
    checkpoint-wrapper prefixes removed, [(tokens_per_expert, dropped_tokens) per MoE layer])."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 33))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss = out["ce_sum"] + out["mtp_sums"].sum()
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters()}
    moes = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    return loss.detach(), grads, [(m.tokens_per_expert.clone(), m.dropped_tokens.clone()) for m in moes]
