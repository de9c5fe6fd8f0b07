"""Qwen2-MoE sparse block: softmax router, top-k fine-grained experts, gated shared expert.

Experts are stacked (E, out, in) and run with gather_mm / gather_qmm through mlx-lm's SwitchGLU,
which also sorts token-expert pairs during prefill. Routing math follows transformers exactly:
softmax in float32 over all experts, top-k, renormalise only when `norm_topk_prob`.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .config import ModelArgs
from .mlp import MLP


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(dim, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(dim, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = MLP(dim, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False)
        self.sharding_group = None  # set by distributed.shard_model: experts hold 1/N of their columns

    def route(self, x: mx.array):
        """Top-k expert indices and their weights (float32) for each token."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.route(x)
        y = self.switch_mlp(x, inds)
        y = (y * scores.astype(y.dtype)[..., None]).sum(axis=-2)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.sharding_group is not None:
            return mx.distributed.all_sum(y + shared, group=self.sharding_group)
        return y + shared
