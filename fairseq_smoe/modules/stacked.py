"""Stacked-MoE baseline (paper Table 1, "Stacking 2x 4-expert / 4x 2-expert MoE"): N plain
top-2 MoE layers applied in sequence inside one FFN slot.

The paper contrasts SMoE with this naive way of giving tokens more expert passes: every token
goes through all N layers, each with its own router over its own E/N experts, and there is
no per-layer LayerNorm or residual (spec §1.10). The slot keeps the Transformer's single
pre-LN and single residual:

    out = h + M_N( ... M_2( M_1( LN(h) ) ) )

where M_i is layer i's routed mixture sum_e g_e FFN_e(z) (top-2, capacity, EoM, Switch
routing and dropout exactly as in a one-stratum SMoE block). The official code did not
release this baseline; this is our reading of the paper's description.
"""

from dataclasses import replace
from typing import Optional, Tuple

from torch import Tensor, nn

from .config import SMoEConfig
from .smoe_block import SMoEBlock
from .stats import BlockStats, SlotStats


def bare_block(cfg: SMoEConfig, ep=None) -> SMoEBlock:
    """A one-stratum SMoE block without its pre-LN: ``block(z) = z + M(z)``."""
    assert cfg.num_strata == 1
    block = SMoEBlock(cfg, ep)
    block.ffn_norm = nn.Identity()
    return block


def routed_mixture(block: SMoEBlock, z_TBd: Tensor, padding_mask_BT: Optional[Tensor],
                   trace: bool = False, stats: bool = True) -> Tuple[Tensor, Optional[BlockStats]]:
    """M(z) of a bare one-stratum block: its output minus the residual it adds (0 at
    positions that are not routed), and the block's statistics. SMoEBlock always adds its
    residual; if it ever grows an option to return only the mixture, this is the one place to
    use it."""
    out, block_stats = block(z_TBd, padding_mask_BT, trace, stats)
    return out - z_TBd, block_stats


class StackedMoE(nn.Module):
    """``x_TBd -> x_TBd``: one FFN slot holding ``cfg.stack`` plain MoE layers in sequence,
    ``cfg.num_experts / cfg.stack`` experts each, with the slot's pre-LN and residual."""

    def __init__(self, cfg: SMoEConfig, ep_for=None):
        super().__init__()
        if cfg.stack < 2:
            raise ValueError("StackedMoE needs cfg.stack >= 2")
        ep_for = ep_for or (lambda num_experts: None)
        self.cfg = cfg
        per_layer = cfg.num_experts // cfg.stack
        layer_cfg = replace(cfg, strata=(per_layer,), stack=1, cmr=False, cmr_gate_drop=0.0)
        self.ffn_norm = nn.LayerNorm(cfg.embed_dim)
        self.blocks = nn.ModuleList([bare_block(layer_cfg, ep_for(per_layer)) for _ in range(cfg.stack)])

    def forward(self, x_TBd: Tensor, padding_mask_BT: Optional[Tensor] = None,
                trace: bool = False, stats: bool = True) -> Tuple[Tensor, Optional[SlotStats]]:
        z = self.ffn_norm(x_TBd)
        blocks = []
        for block in self.blocks:
            z, block_stats = routed_mixture(block, z, padding_mask_BT, trace, stats)
            blocks.append(block_stats)
        return x_TBd + z, (SlotStats(blocks) if stats else None)

    def extra_repr(self) -> str:
        return f"stack={self.cfg.stack}, experts_per_layer={self.cfg.num_experts // self.cfg.stack}"
