"""fairseq Transformer layers whose FFN sub-layer is an SMoE block (or a baseline built on it).

We keep fairseq's own layer code for attention (incremental decoding, cross-attention, ...)
and only swap the FFN: ``build_fc1``/``build_fc2`` build a dense FFN that contributes exactly
zero (a scalar 0 broadcast into the residual add, no compute), and the MoE slot, which owns
the FFN LayerNorm and residual, runs on the layer's output. ``build_moe_slot`` picks the slot:
an SMoE block (one stratum = vanilla MoE / Switch), stacked plain MoE layers (``stack > 1``),
either of them wrapped in CMR (``cmr``).

A layer hands its slot's statistics to the routing record open for the current forward
(``stats.recording``; none open: they are dropped). Activation checkpointing
(``--checkpoint-activations``) is done here rather than by fairseq's wrapper: fairseq's runs the
first forward under ``no_grad`` and returns only the layer output, so the balance loss would
lose its gradient; ours (``torch.utils.checkpoint``, non-reentrant) returns the statistics as
outputs of the checkpointed function, with their gradients, and recomputes the layer in
backward with the same random state (same dropout masks, same sampled second experts).
"""

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .cmr import CMRBlock
from .config import SMoEConfig
from .smoe_block import SMoEBlock
from .stacked import StackedMoE
from .stats import SlotStats, current_record


def build_moe_slot(cfg: SMoEConfig, ep_for=None) -> nn.Module:
    """The FFN slot module for ``cfg``: ``x_TBd, padding_mask_BT, trace -> (x_TBd, stats)``.
    ``ep_for(num_experts)``: the expert-parallel setup for blocks of that many experts, or None."""
    ep_for = ep_for or (lambda num_experts: None)
    moe = StackedMoE(cfg, ep_for) if cfg.stack > 1 else SMoEBlock(cfg, ep_for(cfg.num_experts))
    return CMRBlock(cfg, moe) if cfg.cmr else moe


class _ZeroFFN(nn.Module):
    """Stands in for the dense fc1: its output is a scalar zero, so the stock FFN adds 0."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(())


class _SMoELayerMixin:
    """What the encoder and decoder SMoE layers share: the slot, checkpointing, recording."""

    side = ""

    def _init_moe(self, smoe_cfg: SMoEConfig, layer_index: int, checkpoint_activations: bool, ep_for):
        self.final_layer_norm = nn.Identity()  # the SMoE slot owns the FFN LayerNorm
        self.moe = build_moe_slot(smoe_cfg, ep_for)
        self.layer_index = layer_index
        self.checkpoint_activations = checkpoint_activations

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _ZeroFFN()

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def _run(self, layer_forward, *args, **kwargs):
        """``layer_forward(record, *args, **kwargs) -> (outputs, SlotStats)``, checkpointed if
        asked; the statistics go to the open record (none open: they are not even computed)."""
        record = current_record()
        if self.checkpoint_activations and torch.is_grad_enabled():
            out, stats = checkpoint(layer_forward, record, *args, use_reentrant=False, **kwargs)
        else:
            out, stats = layer_forward(record, *args, **kwargs)
        if record is not None:
            record.add(self.side, self.layer_index, SlotStats.of(stats))
        return out

    def _slot(self, record, x, padding_mask):
        detail = record is not None and record.detail
        return self.moe(x, padding_mask, detail, record is not None)


class SMoEEncoderLayer(_SMoELayerMixin, TransformerEncoderLayerBase):
    side = "encoder"

    def __init__(self, cfg, smoe_cfg: SMoEConfig, return_fc: bool = False, layer_index: int = 0,
                 checkpoint_activations: bool = False, ep_for=None):
        super().__init__(cfg, return_fc=return_fc)
        self._init_moe(smoe_cfg, layer_index, checkpoint_activations, ep_for)

    def _layer(self, record, x, encoder_padding_mask, attn_mask=None):
        out = TransformerEncoderLayerBase.forward(self, x, encoder_padding_mask, attn_mask)
        if isinstance(out, tuple):  # return_fc
            y, stats = self._slot(record, out[0], encoder_padding_mask)
            return (y, out[1]), stats
        return self._slot(record, out, encoder_padding_mask)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        return self._run(self._layer, x, encoder_padding_mask, attn_mask)


class SMoEDecoderLayer(_SMoELayerMixin, TransformerDecoderLayerBase):
    side = "decoder"

    def __init__(self, cfg, smoe_cfg: SMoEConfig, no_encoder_attn=False, add_bias_kv=False,
                 add_zero_attn=False, layer_index: int = 0, checkpoint_activations: bool = False,
                 ep_for=None):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        self._init_moe(smoe_cfg, layer_index, checkpoint_activations, ep_for)

    def _layer(self, record, x, *args, self_attn_padding_mask=None, **kwargs):
        x, attn, state = TransformerDecoderLayerBase.forward(
            self, x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs
        )
        y, stats = self._slot(record, x, self_attn_padding_mask)
        return (y, attn, state), stats

    def forward(self, x, *args, **kwargs):
        return self._run(self._layer, x, *args, **kwargs)
