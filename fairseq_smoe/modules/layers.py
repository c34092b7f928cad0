"""fairseq Transformer layers whose FFN sub-layer is an SMoE block (or a baseline built on it).

We keep fairseq's own layer code for attention (incremental decoding, cross-attention, ...)
and only swap the FFN: ``build_fc1``/``build_fc2`` build a dense FFN that contributes exactly
zero (a scalar 0 broadcast into the residual add, no compute), and the MoE slot, which owns
the FFN LayerNorm and residual, runs on the layer's output. ``build_moe_slot`` picks the slot:
an SMoE block (one stratum = vanilla MoE / Switch), stacked plain MoE layers (``stack > 1``),
either of them wrapped in CMR (``cmr``).
"""

from torch import Tensor, nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .cmr import CMRBlock
from .config import SMoEConfig
from .smoe_block import SMoEBlock
from .stacked import StackedMoE


def build_moe_slot(cfg: SMoEConfig) -> nn.Module:
    """The FFN slot module for ``cfg``: ``x_TBd, padding_mask_BT -> x_TBd`` with residual."""
    moe = StackedMoE(cfg) if cfg.stack > 1 else SMoEBlock(cfg)
    return CMRBlock(cfg, moe) if cfg.cmr else moe


class _ZeroFFN(nn.Module):
    """Stands in for the dense fc1: its output is a scalar zero, so the stock FFN adds 0."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(())


def _disable_dense_ffn(layer: nn.Module) -> None:
    layer.final_layer_norm = nn.Identity()  # the SMoE block owns the FFN LayerNorm


class SMoEEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, smoe_cfg: SMoEConfig, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        _disable_dense_ffn(self)
        self.moe = build_moe_slot(smoe_cfg)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _ZeroFFN()

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def forward(self, x, encoder_padding_mask, attn_mask=None):
        out = super().forward(x, encoder_padding_mask, attn_mask)
        if isinstance(out, tuple):  # return_fc
            return self.moe(out[0], encoder_padding_mask), out[1]
        return self.moe(out, encoder_padding_mask)


class SMoEDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg, smoe_cfg: SMoEConfig, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        _disable_dense_ffn(self)
        self.moe = build_moe_slot(smoe_cfg)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _ZeroFFN()

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def forward(self, x, *args, self_attn_padding_mask=None, **kwargs):
        x, attn, state = super().forward(x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs)
        return self.moe(x, self_attn_padding_mask), attn, state
