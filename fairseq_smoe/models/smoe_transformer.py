"""``smoe_transformer``: fairseq's Transformer with every ``--moe-freq``-th FFN an SMoE block."""

import importlib.util
import re
from typing import List

import torch
from fairseq import hub_utils
from fairseq.distributed import fsdp_wrap
from fairseq.hub_utils import GeneratorHubInterface
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    base_architecture,
)

from .. import fairseq_patches
from ..errors import ConfigError, UserError
from ..modules.cmr import CMRBlock
from ..modules.config import RESIDUAL_MODES, SECOND_EXPERT_POLICIES, SMoEConfig, parse_strata
from ..modules.layers import SMoEDecoderLayer, SMoEEncoderLayer
from ..modules.precision import bf16_autocast, cuda_bf16_capable
from ..modules.expert_parallel import (DEFAULT_SAVE_TIMEOUT_S, DEFAULT_TIMEOUT_S, ExpertParallel, apply_job_timeout,
                                       ep_layout, setup_save_wait)
from ..modules.smoe_block import SMoEBlock
from ..modules.stats import current_record, recording


fairseq_patches.install()  # torch DDP of a CPU model (fairseq's default --ddp-backend); see there


def smoe_config(args, embed_dim: int, ffn_dim: int) -> SMoEConfig:
    """Build the block config from the parsed command line (validates the flags)."""
    return SMoEConfig(
        embed_dim=embed_dim,
        ffn_dim=ffn_dim,
        strata=parse_strata(args.smoe_strata, args.moe_expert_count),
        strata_ffn=parse_widths(args.smoe_strata_ffn),
        top1=args.moe_top1_expert,
        capacity_factor=args.moe_capacity_factor,
        second_expert_policy=args.moe_second_expert_policy,
        inference_noise=args.moe_inference_noise,
        eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
        dropless=args.moe_dropless,
        elastic_passes=args.smoe_elastic_passes,
        eom=args.moe_eom,
        residual=args.smoe_residual,
        exit_norm=args.smoe_exit_norm,
        route_padding=args.moe_route_padding,
        dropout=args.dropout,
        activation_dropout=args.activation_dropout,
        stack=args.moe_stack,
        cmr=args.moe_cmr,
        cmr_gate_drop=args.cmr_gate_drop,
    )


def parse_widths(spec):
    """``--smoe-strata-ffn`` ("512,2048") as a tuple of ints, or None."""
    if spec is None or str(spec).strip() == "":
        return None
    try:
        return tuple(int(f) for f in str(spec).split(","))
    except ValueError:
        raise ConfigError(
            f"--smoe-strata-ffn {spec!r} is not a comma-separated list of integers; give one FFN "
            f"width per stratum, e.g. --smoe-strata-ffn 256,768"
        ) from None


def check_flags(args) -> None:
    """Fail fast, at model build time and before any data is read, on flags outside their
    domain or that cannot form an SMoE model; each message names the flag."""
    if args.moe_freq is None or args.moe_freq < 0:
        raise ConfigError(f"--moe-freq must be >= 0 (0 = a dense model), got {args.moe_freq}")
    layers = max(args.encoder_layers, args.decoder_layers)
    if args.moe_freq > layers:
        raise ConfigError(
            f"--moe-freq {args.moe_freq} makes no layer an SMoE block: the model has "
            f"{args.encoder_layers} encoder and {args.decoder_layers} decoder layers and layer i "
            f"(1-based) is one when i % {args.moe_freq} == 0. Use --moe-freq 1..{layers}, or "
            f"--moe-freq 0 for a dense model"
        )
    for flag in ("scale_fc", "scale_resids"):
        if getattr(args, flag, False):
            raise ConfigError(f"--{flag.replace('_', '-')} is not supported by SMoE layers")
    if getattr(args, "offload_activations", False) and args.moe_freq > 0:
        raise ConfigError(
            "--offload-activations is not supported with SMoE layers (their activation "
            "checkpointing keeps the routing statistics' gradients; fairseq's offloading wrapper "
            "would drop them): use --checkpoint-activations alone"
        )
    cfg = smoe_config(args, args.encoder_embed_dim, args.encoder_ffn_embed_dim)
    if getattr(args, "moe_expert_parallel", False):
        check_expert_parallel(args, cfg)


def check_expert_parallel(args, cfg) -> None:
    """--moe-expert-parallel needs a world size that divides or is divided by the experts of a
    block, and a DDP backend that leaves the expert parameters alone."""
    import torch.distributed as dist

    if args.moe_ep_timeout is None or args.moe_ep_timeout <= 0:
        raise ConfigError(f"--moe-ep-timeout must be > 0 seconds, got {args.moe_ep_timeout}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return  # one process: every expert is local, the flag changes nothing
    experts = cfg.num_experts // cfg.stack
    ep_layout(experts, world, 0)  # raises with E, W and the valid world sizes
    if len(cfg.expert_widths()) > 1:
        raise ConfigError("--moe-expert-parallel cannot be combined with --smoe-strata-ffn (experts of "
                         "different widths): give every stratum the same FFN width")
    ddp = getattr(args, "ddp_backend", "legacy_ddp")
    if ddp not in ("legacy_ddp", "no_c10d"):
        raise ConfigError(
            f"--moe-expert-parallel needs --ddp-backend legacy_ddp (got {ddp}): it must not "
            f"all-reduce the expert parameters, which differ between ranks"
        )
    half = "--fp16" if getattr(args, "fp16", False) else "--bf16" if getattr(args, "bf16", False) else None
    if half and not (getattr(args, "fp16_no_flatten_grads", False) or getattr(args, "memory_efficient_fp16", False)
                     or getattr(args, "memory_efficient_bf16", False)):
        raise ConfigError(
            f"--moe-expert-parallel with {half} needs --fp16-no-flatten-grads (scripts/train.sh adds it): "
            f"fairseq's FP16Optimizer otherwise keeps every parameter in one flat fp32 buffer, whose "
            f"gradient norm would mix this rank's experts into the shared parameters' (the ranks disagree "
            f"and fairseq stops with 'gradients are inconsistent between workers') and whose optimizer "
            f"state cannot be split per expert for checkpoints"
        )
    apply_job_timeout(args.moe_ep_timeout)  # fairseq's own all-reduces fail after it too


def _training_command(args, task):
    """The namespace of the command being run when it is a training one, else None. The model's
    ``args`` are a checkpoint's own at generation (its --fp16 was the training run's), so the
    task's (the current command's) are read; only the training parser has --max-update."""
    cmd = getattr(task, "args", None) or args
    return cmd if hasattr(cmd, "max_update") else None


def check_precision(args, task=None) -> None:
    """Training precision flags that cannot do what they say with this fairseq and device are
    refused with the fix (docs/gpu.md has the table): fairseq 0.12's --bf16 is its TPU flag,
    --fp16 needs CUDA (FP16Optimizer), --amp is CUDA-only autocast (on CPU it would silently run
    fp32), and --smoe-bf16 (the plugin's bf16 path) replaces all three. Generation is not
    checked: its --fp16/--bf16 cast the model and run on CPU too."""
    cmd = _training_command(args, task)
    if cmd is None:
        return
    smoe_bf16 = getattr(cmd, "smoe_bf16", False)
    cuda = torch.cuda.is_available() and not getattr(cmd, "cpu", False)
    fp16 = "--memory-efficient-fp16" if getattr(cmd, "memory_efficient_fp16", False) else \
        "--fp16" if getattr(cmd, "fp16", False) else None
    bf16 = "--memory-efficient-bf16" if getattr(cmd, "memory_efficient_bf16", False) else \
        "--bf16" if getattr(cmd, "bf16", False) else None
    amp = "--amp" if getattr(cmd, "amp", False) else None
    if smoe_bf16 and (fp16 or bf16 or amp):
        raise UserError(
            f"--smoe-bf16 cannot be combined with {fp16 or bf16 or amp}: --smoe-bf16 is a precision of its own "
            f"(bf16 autocast, fp32 weights and optimizer, no loss scaling); drop {fp16 or bf16 or amp}")
    if bf16 and importlib.util.find_spec("torch_xla") is None:
        raise UserError(
            f"{bf16} is fairseq 0.12's TPU flag: it turns on --tpu and asks torch_xla (not installed) for "
            f"an XLA device. For bf16 training on a GPU (A100, H100: compute capability 8.0+) or on CPU use "
            f"--smoe-bf16 instead (bf16 autocast with fp32 weights and optimizer, no loss scaling; docs/gpu.md)")
    where = "--cpu was given" if getattr(cmd, "cpu", False) else "torch sees no CUDA device"
    if fp16 and not cuda:
        raise UserError(
            f"{fp16} needs a CUDA GPU ({where}): fairseq's FP16Optimizer keeps its fp32 master weights "
            f"on torch.cuda.current_device(). On CPU drop {fp16} (fp32 training), or use --smoe-bf16 for "
            f"bf16 autocast on CPU")
    if amp and not cuda:
        raise UserError(
            f"--amp needs a CUDA GPU ({where}): it is fairseq's torch.cuda.amp fp16 autocast, which does "
            f"nothing to a CPU model, so this run would train in fp32. Drop --amp (fp32), or use --smoe-bf16 "
            f"for bf16 autocast on CPU")
    if smoe_bf16 and cuda and not cuda_bf16_capable():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        raise UserError(
            f"--smoe-bf16 needs a GPU that computes bf16 (compute capability 8.0+: A100, H100, ...); "
            f"{name} has {major}.{minor} and would emulate it, far slower than fp16. Use --fp16 or --amp "
            f"on this GPU instead")


def expert_parallel_for(cfg):
    """``num_experts -> ExpertParallel or None`` for the blocks of this model (None for every
    size without --moe-expert-parallel or with a single process)."""
    if not getattr(cfg, "moe_expert_parallel", False):
        return lambda num_experts: None
    return lambda num_experts: ExpertParallel.for_job(num_experts, cfg.moe_ep_timeout)


def is_moe_layer(index: int, moe_freq: int) -> bool:
    """Layer ``index`` (0-based) is an SMoE layer when (index + 1) % moe_freq == 0."""
    return moe_freq > 0 and (index + 1) % moe_freq == 0


def _wrap(layer, cfg):
    # fairseq's FSDP wrapping of its own layers; activation checkpointing of SMoE layers is the
    # layer's own (modules/layers.py: fairseq's wrapper would cut the balance loss's gradient)
    min_params = cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0
    return fsdp_wrap(layer, min_num_params=min_params)


class SMoETransformerEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        index = self.__dict__.setdefault("_layers_built", 0)
        self._layers_built = index + 1
        if not is_moe_layer(index, cfg.moe_freq):
            return super().build_encoder_layer(cfg)
        smoe_cfg = smoe_config(cfg, cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim)
        layer = SMoEEncoderLayer(cfg, smoe_cfg, return_fc=self.return_fc, layer_index=index,
                                 checkpoint_activations=cfg.checkpoint_activations,
                                 ep_for=expert_parallel_for(cfg))
        return _wrap(layer, cfg)


class SMoETransformerDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index = self.__dict__.setdefault("_layers_built", 0)
        self._layers_built = index + 1
        if not is_moe_layer(index, cfg.moe_freq):
            return super().build_decoder_layer(cfg, no_encoder_attn)
        smoe_cfg = smoe_config(cfg, cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim)
        layer = SMoEDecoderLayer(cfg, smoe_cfg, no_encoder_attn, layer_index=index,
                                 checkpoint_activations=cfg.checkpoint_activations,
                                 ep_for=expert_parallel_for(cfg))
        return _wrap(layer, cfg)


class SMoEHubInterface(GeneratorHubInterface):
    """fairseq's hub interface, decoding as ``fairseq-generate`` does: the symbols the task's
    generator strips from its output (the target-language token the multilingual task forces,
    unless ``--keep-inference-langtok``) are stripped here too; fairseq's hub leaves them in."""

    def __init__(self, cfg, task, models):
        super().__init__(cfg, task, models)
        self.symbols_to_strip = task.build_generator(models, cfg.generation).symbols_to_strip_from_output

    def string(self, tokens):
        return self.tgt_dict.string(tokens, extra_symbols_to_ignore=self.symbols_to_strip)


@register_model("smoe_transformer")
class SMoETransformerModel(TransformerModel):
    """Transformer (pre-LN) whose every ``--moe-freq``-th encoder and decoder FFN is an SMoE
    block with ``--moe-expert-count`` experts split into strata ``--smoe-strata``."""

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        """fairseq's hub loading, returning an :class:`SMoEHubInterface`."""
        x = hub_utils.from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path,
                                      archive_map=cls.hub_models(), **kwargs)
        return SMoEHubInterface(x["args"], x["task"], x["models"])

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--moe-expert-count", type=int, metavar="E",
                            help="experts per SMoE block (default: 8, or 16 for the big arch)")
        parser.add_argument("--moe-freq", type=int, metavar="N",
                            help="every N-th FFN (1-based) of encoder and decoder is an SMoE block; "
                            "0 = none (a dense transformer) (default: 2)")
        parser.add_argument("--smoe-strata", type=str, metavar="n1,n2,...",
                            help="experts per stratum in order, summing to --moe-expert-count; "
                            "one stratum = vanilla top-2 MoE (default: one stratum)")
        parser.add_argument("--smoe-strata-ffn", type=str, metavar="f1,f2,...",
                            help="FFN width of each stratum's experts, one per stratum (default: "
                            "every stratum --encoder-ffn-embed-dim / --decoder-ffn-embed-dim)")
        parser.add_argument("--moe-top1-expert", action="store_true",
                            help="Switch-style top-1 routing with --moe-capacity-factor")
        parser.add_argument("--moe-capacity-factor", type=float, metavar="CF",
                            help="top-1 training capacity per expert = int(CF * ceil(tokens/experts)) "
                            "(default: 1.0)")
        parser.add_argument("--moe-second-expert-policy", choices=SECOND_EXPERT_POLICIES,
                            help="second expert in training: sampling (Gumbel), all (argmax), random "
                            "(kept with probability 2*g2) (default: sampling); evaluation always "
                            "uses the argmax unless --moe-inference-noise")
        parser.add_argument("--moe-inference-noise", action="store_true",
                            help="keep the second-expert noise at inference, as the official code "
                            "does (generation is then not deterministic)")
        parser.add_argument("--moe-eval-capacity-token-fraction", type=float, metavar="F",
                            help="eval/generation capacity per expert = ceil(F * tokens); "
                            "default: unlimited, no token is ever dropped")
        parser.add_argument("--moe-dropless", action="store_true",
                            help="no capacity limit in training either: no assignment is ever "
                            "dropped (MegaBlocks/Tutel-style); the paper trains with capacity "
                            "2*ceil(S/V) (top-2) or the capacity factor (top-1), which this ignores")
        parser.add_argument("--smoe-elastic-passes", action="store_true",
                            help="training: every token of every block forward gets a random pass "
                            "budget K in 1..L (it leaves after K passes whatever its router says), "
                            "so that one model serves every --smoe-max-passes at inference")
        parser.add_argument("--moe-eom", type=float, metavar="P",
                            help="expert output masking rate (default: 0.0)")
        parser.add_argument("--smoe-residual", choices=RESIDUAL_MODES,
                            help="official: the released code's LayerNorm/residual behaviour that "
                            "produced the paper's numbers; paper: Eq. 4-7 (default: official)")
        parser.add_argument("--smoe-exit-norm", action="store_true",
                            help="an exit LayerNorm on the block output where the residual mode has "
                            "none: one stratum (the official code's --hmoe-layer 1 --hmoe-layernorm 1 "
                            "vanilla MoE) or --smoe-residual paper; official mode with several strata "
                            "always has it (default: off, one stratum = the --hmoe-layer 0 path)")
        parser.add_argument("--moe-expert-parallel", action="store_true",
                            help="split each SMoE block's experts over the ranks of the job (E/W "
                            "per rank; each expert replicated W/E times when E < W) and exchange "
                            "tokens with all-to-all; needs --ddp-backend legacy_ddp (default: every "
                            "rank holds every expert)")
        parser.add_argument("--moe-ep-timeout", type=int, metavar="SECONDS",
                            help="expert-parallel collectives fail after this long without a peer "
                            f"(a rank that died or stalled) instead of hanging; also applied to the "
                            f"job's other collectives (default: {DEFAULT_TIMEOUT_S})")
        parser.add_argument("--moe-save-timeout", type=int, metavar="SECONDS",
                            help="with several ranks: after each checkpoint save every rank waits this "
                            "long for rank 0 to finish writing (a barrier of its own, on gloo), instead of "
                            "meeting it in the next step's collectives under --moe-ep-timeout "
                            f"(default: {DEFAULT_SAVE_TIMEOUT_S})")
        parser.add_argument("--moe-sharded-checkpoint", action="store_true",
                            help="with --moe-expert-parallel: every checkpoint is a small index "
                            "(NAME.pt) and one file per expert-holding rank, written without gathering "
                            "the experts to rank 0; it loads at any world size like the default "
                            "consolidated file (python -m fairseq_smoe.checkpoints consolidate/"
                            "reshard convert between the two)")
        parser.add_argument("--smoe-bf16", action="store_true",
                            help="train with bf16 autocast (torch.autocast, bfloat16) on a GPU of "
                            "compute capability 8.0+ (A100, H100) or on CPU: weights, gradients and "
                            "Adam state stay fp32, no loss scaling; validation and generation run in "
                            "fp32, as with --amp. fairseq 0.12's own --bf16 is its TPU flag and is "
                            "refused (docs/gpu.md)")
        parser.add_argument("--moe-route-padding", action="store_true",
                            help="route padding tokens like real ones (official behaviour; "
                            "default: padding takes no capacity)")
        parser.add_argument("--moe-stack", type=int, metavar="N",
                            help="stacked-MoE baseline: N plain top-2 MoE layers in sequence in "
                            "each MoE FFN slot, --moe-expert-count/N experts each, one pre-LN and "
                            "one residual around the stack (default: 1, no stacking)")
        parser.add_argument("--moe-cmr", action="store_true",
                            help="CMR baseline: mix a shared dense FFN with the MoE by a per-token "
                            "sigmoid gate, out = h + (1-g) FFN(u) + g MoE(u); train with the "
                            "criterion's --cmr-gate-loss-wt/--cmr-gate-loss-p budget loss")
        parser.add_argument("--cmr-gate-drop", type=float, metavar="P",
                            help="dropout on the CMR gate (paper: 0.1; default: 0.0)")

    @classmethod
    def build_model(cls, args, task):
        smoe_base_architecture(args)
        check_flags(args)
        check_precision(args, task)
        if _training_command(args, task) is not None:
            if args.moe_save_timeout is None or args.moe_save_timeout <= 0:
                raise UserError(f"--moe-save-timeout must be > 0 seconds, got {args.moe_save_timeout}")
            setup_save_wait(args.moe_save_timeout)  # several ranks: the save's own wait (docs/gpu.md)
        model = super().build_model(args, task)
        model.smoe_bf16 = bool(getattr(args, "smoe_bf16", False))
        return model

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return SMoETransformerEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return SMoETransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def forward(self, *args, **kwargs):
        """fairseq's forward; for a model with MoE slots the decoder's ``extra`` dict gains
        ``"routing"``: the ``RoutingRecord`` of this forward (the statistics of every MoE slot
        that ran, see modules/stats.py). If a record is already open, this forward adds to it."""
        if getattr(self, "smoe_bf16", False) and self.training:  # --smoe-bf16: training forwards only
            with bf16_autocast(self.encoder.embed_tokens.weight.device.type, True):
                return self._forward(*args, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        if not self.has_moe_slots():
            return super().forward(*args, **kwargs)
        record = current_record()
        with recording(record) as record:
            out, extra = super().forward(*args, **kwargs)
        extra["routing"] = record
        return out, extra

    def set_max_passes(self, k) -> None:
        """The compute dial (``--smoe-max-passes``): evaluation and generation stop every token
        after ``k`` strata passes in every SMoE block (None: no cap)."""
        blocks = self.smoe_blocks("encoder") + self.smoe_blocks("decoder")
        strata = max((block.cfg.num_strata for block in blocks), default=0)
        if k is not None and not 1 <= k <= strata:
            raise ConfigError(
                f"--smoe-max-passes {k}: this model has no SMoE block, so there are no passes to cap; leave "
                f"the flag out" if not blocks else
                f"--smoe-max-passes {k}: the SMoE blocks of this model have {strata} strata; give a pass "
                f"budget K in 1..{strata}, or leave the flag out for the model as trained")
        for block in blocks:
            block.set_max_passes(k)

    def has_moe_slots(self) -> bool:
        """Whether any layer has an MoE FFN slot (False for ``--moe-freq 0``). Not by iterating
        ``layers``: with layerdrop, iterating a LayerDropModuleList in training skips layers."""
        if "_has_moe_slots" not in self.__dict__:
            self._has_moe_slots = any(isinstance(m, (SMoEEncoderLayer, SMoEDecoderLayer)) for m in self.modules())
        return self._has_moe_slots

    def smoe_blocks(self, side: str) -> List[SMoEBlock]:
        """The SMoE blocks of ``side`` ('encoder' or 'decoder'), in layer order (each layer of
        a stacked-MoE slot is one block)."""
        return [m for m in getattr(self, side).modules() if isinstance(m, SMoEBlock)]

    def cmr_blocks(self, side: str) -> List[CMRBlock]:
        """The CMR slots of ``side`` ('encoder' or 'decoder'), in layer order."""
        return [m for m in getattr(self, side).modules() if isinstance(m, CMRBlock)]

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as err:
            raise RuntimeError(_mismatch_message(self, state_dict) + f"\n\nPyTorch said: {err}") from None


def _describe_smoe(state_dict) -> str:
    """'E experts, strata a,b,...' (plus stacking / CMR) of the first MoE slot in a state dict."""
    routers = {}  # block prefix -> {router index: experts it scores}, in state-dict order
    for name, tensor in state_dict.items():
        m = re.match(r"^(.*\.moe(?:\.[^.]+)*?)\.routers\.(\d+)\.weight$", name)
        if m:
            routers.setdefault(m.group(1), {})[int(m.group(2))] = tensor.shape[0]
    if not routers:
        return "no SMoE blocks (a dense model?)"
    block = next(iter(routers))
    slot = block[: block.index(".moe") + len(".moe")]
    V = [routers[block][i] for i in sorted(routers[block])] + [0]
    strata = [V[s] - V[s + 1] for s in range(len(V) - 1)]
    stacked = sum(1 for b in routers if b.startswith(slot + "."))
    text = f"{V[0]} experts per block in strata {','.join(map(str, strata))}"
    if stacked > 1:
        text = f"{stacked} stacked MoE layers of {V[0]} experts per slot"
    if f"{slot}.gate.weight" in state_dict:
        text += ", with CMR"
    return text


def _mismatch_message(model, state_dict) -> str:
    return (
        f"The checkpoint does not fit this smoe_transformer model: the checkpoint has "
        f"{_describe_smoe(state_dict)}, this model has {_describe_smoe(model.state_dict())}. "
        f"Build the model with the checkpoint's flags (--arch, --moe-expert-count, "
        f"--smoe-strata, --moe-stack, --moe-cmr, --moe-freq, dims), or train into a new "
        f"--save-dir instead of resuming this one."
    )


def _default(args, name, value):
    if getattr(args, name, None) is None:
        setattr(args, name, value)


@register_model_architecture("smoe_transformer", "smoe_transformer")
def smoe_base_architecture(args):
    """M4 size (spec §5.1): 6+6 layers, d 512, FFN 2048, 8 heads, 8 experts, pre-LN."""
    # SMoE blocks are pre-LN (the paper's setting); fairseq's store_true default is False,
    # so this is set rather than defaulted.
    args.encoder_normalize_before = args.decoder_normalize_before = True
    _default(args, "moe_expert_count", 8)
    _default(args, "moe_freq", 2)
    _default(args, "smoe_strata", "")
    _default(args, "smoe_strata_ffn", None)
    _default(args, "moe_capacity_factor", 1.0)
    _default(args, "moe_second_expert_policy", "sampling")
    _default(args, "moe_eom", 0.0)
    _default(args, "smoe_residual", "official")
    for flag in ("moe_top1_expert", "moe_inference_noise", "moe_route_padding", "moe_cmr", "smoe_exit_norm", "moe_dropless",
                 "smoe_elastic_passes", "smoe_bf16"):
        _default(args, flag, False)
    _default(args, "moe_stack", 1)
    _default(args, "moe_expert_parallel", False)
    _default(args, "moe_ep_timeout", DEFAULT_TIMEOUT_S)
    _default(args, "moe_save_timeout", DEFAULT_SAVE_TIMEOUT_S)
    _default(args, "moe_sharded_checkpoint", False)
    _default(args, "cmr_gate_drop", 0.0)
    _default(args, "moe_eval_capacity_token_fraction", None)
    base_architecture(args)


@register_model_architecture("smoe_transformer", "smoe_transformer_tiny")
def smoe_tiny_architecture(args):
    """For tests and the CPU demo: 2+2 layers, d 128, FFN 512, 4 heads, 4 experts, layer 2 of
    each side an SMoE block."""
    _default(args, "encoder_embed_dim", 128)
    _default(args, "encoder_ffn_embed_dim", 512)
    _default(args, "encoder_layers", 2)
    _default(args, "encoder_attention_heads", 4)
    _default(args, "decoder_layers", 2)
    _default(args, "decoder_attention_heads", 4)
    _default(args, "moe_expert_count", 4)
    smoe_base_architecture(args)


@register_model_architecture("smoe_transformer", "smoe_transformer_big")
def smoe_big_architecture(args):
    """M15 / OPUS-100 size: 6+6 layers, d 1024, FFN 4096, 16 heads, 16 experts."""
    _default(args, "encoder_embed_dim", 1024)
    _default(args, "encoder_ffn_embed_dim", 4096)
    _default(args, "encoder_attention_heads", 16)
    _default(args, "decoder_attention_heads", 16)
    _default(args, "moe_expert_count", 16)
    smoe_base_architecture(args)
