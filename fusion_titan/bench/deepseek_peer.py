"""torchtitan's own DeepSeek-V3, sized like one of our flavors: the peer of scripts/benchmark.py.

Importing this module (`--experimental.custom_import fusion_titan.bench.deepseek_peer`) registers
the TrainSpec "deepseek_v3_peer": torchtitan's DeepSeekV3Model, its parallelize function, loss
(unfused cross entropy), optimizer builder and MoE load balancing, unchanged. Only the
tokenizer and dataloader are ours, because torchtitan's read Hugging Face assets that do not
exist offline — so both models see the very same token stream.

Each of our flavors gets a matched peer flavor of the same name: same width, depth, vocabulary,
heads, MLA ranks and head dims, routed/shared/active experts and their width, group-limited
sigmoid routing. Our Gated DeltaNet blocks carry a dense SwiGLU FFN; the peer puts the same
number of dense-FFN layers first (its `n_dense_layers`) with MLA in their place.
"""

from __future__ import annotations

from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.models.deepseek_v3 import get_train_spec as deepseek_train_spec
from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
from torchtitan.models.moe import MoEArgs
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

import fusion_titan.spec  # noqa: F401  (our TOML sections and tokenizer)
from fusion_titan.data.dataloader import build_dataloader
from fusion_titan.data.tokenizer import build_tokenizer
from fusion_titan.model.flavors import FLAVORS

PEER_NAME = "deepseek_v3_peer"


def matched_args(flavor: str) -> DeepSeekV3ModelArgs:
    ours = FLAVORS[flavor]
    return DeepSeekV3ModelArgs(
        vocab_size=ours.vocab_size, dim=ours.dim, n_layers=ours.n_layers,
        inter_dim=ours.ffn_hidden_dim, moe_inter_dim=ours.moe_inter_dim,
        n_dense_layers=len(ours.block_kinds()) - ours.block_kinds().count("mla"), n_heads=ours.n_heads,
        q_lora_rank=ours.q_lora_rank, kv_lora_rank=ours.kv_lora_rank,
        qk_nope_head_dim=ours.qk_nope_head_dim, qk_rope_head_dim=ours.qk_rope_head_dim,
        v_head_dim=ours.v_head_dim, max_seq_len=ours.max_seq_len, attn_type="sdpa",
        moe_args=MoEArgs(
            num_experts=ours.n_routed_experts, num_shared_experts=ours.n_shared_experts,
            top_k=ours.n_activated_experts, num_expert_groups=ours.n_expert_groups,
            num_limited_groups=ours.n_limited_groups, score_func="sigmoid", route_norm=True,
            route_scale=ours.route_scale, score_before_experts=False,
        ),
    )


class WithoutLabels(BaseDataLoader):
    """Our loader's batches minus the "labels" key (the peer's forward takes tokens only)."""

    def __init__(self, inner: BaseDataLoader):
        self.inner = inner

    def __iter__(self):
        for inputs, labels in self.inner:
            yield {k: v for k, v in inputs.items() if k != "labels"}, labels

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)


def build_peer_dataloader(*args, **kwargs) -> WithoutLabels:
    return WithoutLabels(build_dataloader(*args, **kwargs))


def register() -> None:
    try:
        get_train_spec(PEER_NAME)
        return
    except ValueError:
        pass
    spec = deepseek_train_spec()
    spec.model_args = {name: matched_args(name) for name in FLAVORS if name != "debugmodel"}
    spec.model_args["debugmodel"] = matched_args("debugmodel")
    spec.build_tokenizer_fn = build_tokenizer
    spec.build_dataloader_fn = build_peer_dataloader
    spec.pipelining_fn = None
    register_train_spec(PEER_NAME, spec)


register()
