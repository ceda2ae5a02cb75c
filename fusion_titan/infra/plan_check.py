"""Refuse a parallel plan that cannot shard, before torchtitan builds the device mesh.

torchtitan 0.2.2 finds these out deep inside DeviceMesh (`The product of mesh_sizes=(...) is 6,
but the original dimension at dim=0 has size 8`); here each one names the TOML key to change.
"""

from __future__ import annotations


def check_parallel_plan(parallelism, world_size: int, n_routed_experts: int) -> None:
    p = parallelism
    fixed = p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree \
        * p.pipeline_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        if world_size % fixed:
            raise ValueError(
                f"{world_size} ranks cannot be split into data_parallel_replicate x context x tensor "
                f"x pipeline degrees = {fixed}; make their product divide the number of GPUs "
                "([parallelism] in the TOML)"
            )
        shard = world_size // fixed
    if shard * fixed != world_size:
        raise ValueError(
            f"[parallelism] data_parallel_shard_degree {shard} x replicate x context x tensor x "
            f"pipeline ({fixed}) = {shard * fixed}, but {world_size} ranks were started; set "
            "data_parallel_shard_degree = -1 to use every rank"
        )
    ep, etp = p.expert_parallel_degree, p.expert_tensor_parallel_degree
    if ep > 1:
        if n_routed_experts == 0:
            raise ValueError("[parallelism] expert_parallel_degree > 1 needs routed experts "
                             "(n_routed_experts = 0 in this model); set it to 1")
        if n_routed_experts % ep:
            raise ValueError(
                f"[parallelism] expert_parallel_degree {ep} must divide n_routed_experts "
                f"{n_routed_experts}; use one of "
                f"{[d for d in range(1, n_routed_experts + 1) if n_routed_experts % d == 0 and d <= world_size]}"
            )
        span = shard * p.context_parallel_degree * p.tensor_parallel_degree
        if span % (ep * etp):
            raise ValueError(
                f"[parallelism] expert_parallel_degree {ep} (x expert_tensor_parallel_degree {etp}) "
                f"must divide data_parallel_shard_degree x context x tensor = {span}: experts are "
                "spread over the ranks that shard the dense weights"
            )
