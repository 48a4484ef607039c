"""Sparse mixture-of-experts MLP (Qwen2-MoE and Qwen3-MoE) with stacked expert weights.

Tokens are routed top-k, sorted by expert, and every expert's slice is multiplied in one grouped matmul
(torch._grouped_mm), so there is no Python loop over experts or tokens. Weight names and layouts match transformers
(mlp.gate.weight, mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.model.config import ModelConfig


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids and weights [N, k]. Returns sum_k weights * expert_k(x), shape [N, H]."""
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k  # which input row each sorted slot came from
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[token]
        gate_up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.has_shared_expert:
            from qwenkit.model.qwen import MLP

            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Router softmax in fp32, as the reference does: top-k choices must not flip with the compute dtype.
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)
