"""Routing, dispatch, experts and the SMoE block: plain PyTorch, no fairseq registries."""

from .config import SMoEConfig, parse_strata
from .experts import StackedExperts
from .smoe_block import SMoEBlock

__all__ = ["SMoEConfig", "SMoEBlock", "StackedExperts", "parse_strata"]
