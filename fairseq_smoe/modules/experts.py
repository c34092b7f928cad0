"""E expert FFNs stored as stacked weights, so a stratum's visible experts are a slice."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StackedExperts(nn.Module):
    """E independent FFNs d -> d_ff -> ReLU -> d, weights ``[E, d, d_ff]`` and ``[E, d_ff, d]``.

    Each expert is initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), i.e. like
    fairseq's dense FFN, so a 1-expert block can be loaded from / compared with a dense FFN.
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.embed_dim, self.ffn_dim = num_experts, embed_dim, ffn_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.activation_dropout = activation_dropout
        self.reset_parameters()

    def reset_parameters(self):
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim), (self.w2, self.b2, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x_VCd: Tensor, first: int = 0) -> Tensor:
        """Run experts ``first .. E-1`` on their buffers: ``[V, C, d] -> [V, C, d]``."""
        h = torch.baddbmm(self.b1[first:].unsqueeze(1), x_VCd, self.w1[first:])
        h = F.relu(h)
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return torch.baddbmm(self.b2[first:].unsqueeze(1), h, self.w2[first:])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}"
