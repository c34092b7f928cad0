"""CMR baseline (Conditional MoE Routing; spec §1.10): a shared dense FFN mixed with the MoE
by a per-token sigmoid gate.

With u = LN(h) the slot's normalised input (the MoE's own pre-LN) and g the gate,

    g   = dropout(sigmoid(w . u + b))        # torch dropout: kept gates are scaled by 1/(1-p)
    out = h + (1 - g) * FFN_shared(u) + g * MoE(u)

FFN_shared has an expert's shape (Linear d->d_ff, ReLU, activation dropout, Linear d_ff->d,
dropout). The gate is zeroed at padding positions (unless padding is routed) and the
criterion adds the budget loss |sum g / #tokens - p| over all CMR slots of the model.

We write the slot as a convex mix of the two sub-layer outputs,
``out = (1 - g) * (h + FFN_shared(u)) + g * moe(h)``, where ``moe(h)`` is the wrapped slot
output including its residual. For a one-stratum block, a stacked MoE, or SMoE with
``--smoe-residual paper`` (moe(h) = h + update) this is exactly the formula above. With the
official residual and L > 1 strata the SMoE output has passed the exit LayerNorm, so the
mix is between the dense path and the normalised SMoE output (the official code could not
combine CMR with SMoE at all).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SMoEConfig
from .precision import autocast_off
from .stats import CMRStats, SlotStats


class CMRBlock(nn.Module):
    """``x_TBd -> (x_TBd, SlotStats)``: shared FFN + gate around ``moe`` (an SMoEBlock or
    StackedMoE, which owns the pre-LN ``ffn_norm`` and the residual). The statistics carry the
    wrapped blocks' and the gate's (``CMRStats``: sum of the gates over counted tokens, with
    grad, for the budget loss, and the counted tokens: non-padding unless padding is routed).
    """

    def __init__(self, cfg: SMoEConfig, moe: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.moe = moe
        d, f = cfg.embed_dim, cfg.ffn_dim
        self.gate = nn.Linear(d, 1)
        self.shared_fc1 = nn.Linear(d, f)
        self.shared_fc2 = nn.Linear(f, d)

    @property
    def ffn_norm(self) -> nn.Module:
        return self.moe.ffn_norm

    def shared_ffn(self, u: Tensor) -> Tensor:
        h = F.relu(self.shared_fc1(u))
        h = F.dropout(h, p=self.cfg.activation_dropout, training=self.training)
        return F.dropout(self.shared_fc2(h), p=self.cfg.dropout, training=self.training)

    def gates(self, u_TBd: Tensor, padding_mask_BT: Optional[Tensor]):
        """(g_TB in fp32 after dropout and padding mask, number of counted tokens)."""
        with autocast_off(u_TBd):  # the gate is fp32 always
            logit = F.linear(u_TBd.float(), self.gate.weight.float(), self.gate.bias.float())
        g = F.dropout(torch.sigmoid(logit.squeeze(-1)), p=self.cfg.cmr_gate_drop, training=self.training)
        if padding_mask_BT is not None and not self.cfg.route_padding:
            keep_TB = ~padding_mask_BT.t()
            return g * keep_TB.to(g.dtype), keep_TB.sum()
        # a fill on g's device, not torch.tensor(..., device=): no host-to-device copy per forward
        return g, g.new_full((), g.numel(), dtype=torch.long)

    def forward(self, x_TBd: Tensor, padding_mask_BT: Optional[Tensor] = None,
                trace: bool = False, stats: bool = True) -> Tuple[Tensor, Optional[SlotStats]]:
        u = self.ffn_norm(x_TBd)
        g_TB, count = self.gates(u, padding_mask_BT)
        dense = x_TBd + self.shared_ffn(u)
        moe, moe_stats = self.moe(x_TBd, padding_mask_BT, trace, stats)
        g = g_TB.to(x_TBd.dtype).unsqueeze(-1)
        out = (1 - g) * dense + g * moe
        if not stats:
            return out, None
        return out, SlotStats(SlotStats.of(moe_stats).blocks, cmr=CMRStats(g_TB.sum(), count))

    def extra_repr(self) -> str:
        return f"gate_drop={self.cfg.cmr_gate_drop}"
