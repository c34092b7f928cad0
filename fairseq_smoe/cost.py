"""Parameters and forward FLOPs per token of a recipe, counted as the paper's tables do.

    python -m fairseq_smoe.cost m4/dense m4/smoe-2-2-2-2 [...] [--vocab-size 32000] [--json]
    python -m fairseq_smoe.cost m15/smoe-4-12 --checkpoint CKPT --data DATA_DIR   # measured passes

Analytical: the flags are parsed with fairseq's own parser and architecture defaults (no
model is built), then counted in closed form. ``tests/test_cost.py`` checks the count
against real (tiny) models parameter by parameter.

**#params**: every parameter of the model: token embeddings (one table with
``--share-all-embeddings``, the paper's 32k vocabulary by default: ``--vocab-size``),
attention, dense FFNs, LayerNorms, and per MoE slot its pre-LN, routers, strata LayerNorms,
experts (all of them), CMR gate and shared FFN. Sinusoidal positions have no parameters.

**FLOPs per token** (forward pass, Kaplan et al. 2020, which the paper cites):

    FLOPs/tok = 2 * N_active + 2 * d * V + 2 * n_layer * n_ctx * d

* ``N_active``: the parameters one token uses: everything above except the experts it is not
  routed to. Per MoE slot a token uses k experts per pass (k = 2, Switch k = 1) and E[RC]
  passes; a stacked slot of N layers is N passes; CMR adds its shared FFN and gate; routers,
  strata norms and the embedding table are counted whole (as in the #params column).
* ``2 * d * V``: the output projection (tied to the embedding, so not in N twice).
* ``2 * n_layer * n_ctx * d``: Kaplan's attention-over-context term, with n_layer = encoder +
  decoder layers and n_ctx = max source + max target positions (512 + 512).
* E[RC], the passes per token through an SMoE block, is by default its expectation under
  balanced top-1 routing (spec §1.7): E[RC] = 1 + sum_{j<L-1} n_j / V_j with V_j the experts
  stratum j sees (4-12: 1.25, 2-2-2-2: 2.083). With ``--checkpoint CKPT --data DIR`` it is
  measured instead: the model runs (teacher forcing) on the ``--subset`` (valid) of DIR and
  each block's mean passes per routed token is used (encoder blocks per source token,
  decoder blocks per target token).

The paper does not state its convention; this one is our reconstruction, with no constant
fitted to the tables. It gives every #Params and FLOPs/tok value of Tables 1 and 2 within 1%
(M4 FLOPs -0.4%..0%, M15 FLOPs +0.4%..+0.8%, #params +0.03%..+0.9% of the paper's rounded
values), except FLOPs of "Stacking 4x 2-expert MoE": 4 stacked layers x top-2 = 8 expert FFNs
per slot give 342.8M where the paper prints 327M (+4.8%), while the same count gives the
"Stacking 2x 4-expert" row exactly (242.0M vs 242M); no per-layer count fits both rows.
"""

import argparse
import json
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from . import errors
from .checkpoint_io import CheckpointError
from .recipes import load_config

DEFAULT_VOCAB = 32000


class CostError(errors.UserError, ValueError):
    """A flag of the cost tool out of its domain."""


@dataclass(frozen=True)
class Shape:
    """What the count needs from a model's flags."""

    enc_layers: int
    dec_layers: int
    enc_dim: int
    dec_dim: int
    enc_ffn: int
    dec_ffn: int
    vocab: int
    share_all: bool
    share_dec_io: bool
    learned_pos: bool
    max_src: int
    max_tgt: int
    layernorm_embedding: bool
    enc_final_norm: bool
    dec_final_norm: bool
    moe_freq: int
    strata: Tuple[int, ...]
    top1: bool
    stack: int
    cmr: bool
    residual: str
    strata_ffn: Optional[Tuple[int, ...]] = None  # per stratum (None: the side's FFN width)
    exit_norm: bool = False

    @property
    def k(self) -> int:
        return 1 if self.top1 else 2


def stock_model(args) -> Optional[str]:
    """None for the model flags of an ``smoe_transformer`` (they have the SMoE options); else
    what the model is, for messages: "a stock fairseq 'transformer' model without SMoE blocks"."""
    if args is None or getattr(args, "moe_expert_count", None) is not None:
        return None
    arch = getattr(args, "arch", None) or getattr(args, "_name", None) or "unknown"
    return f"a stock fairseq {arch!r} model without SMoE blocks"


def shape_from_args(args, vocab: int) -> Shape:
    """The count's view of a model's flags; a stock fairseq transformer (no SMoE options) is
    counted as the dense model it is."""
    from fairseq.models.transformer import DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS

    from .models.smoe_transformer import parse_widths
    from .modules.config import parse_strata

    stock = stock_model(args) is not None
    strata = (1,) if stock else parse_strata(getattr(args, "smoe_strata", ""), args.moe_expert_count)
    return Shape(
        enc_layers=args.encoder_layers, dec_layers=args.decoder_layers,
        enc_dim=args.encoder_embed_dim, dec_dim=args.decoder_embed_dim,
        enc_ffn=args.encoder_ffn_embed_dim, dec_ffn=args.decoder_ffn_embed_dim,
        vocab=vocab,
        share_all=bool(args.share_all_embeddings),
        share_dec_io=bool(args.share_all_embeddings or args.share_decoder_input_output_embed),
        learned_pos=bool(getattr(args, "encoder_learned_pos", False)),
        # fairseq's defaults when a recipe leaves them unset (TransformerModel.build_model)
        max_src=getattr(args, "max_source_positions", None) or DEFAULT_MAX_SOURCE_POSITIONS,
        max_tgt=getattr(args, "max_target_positions", None) or DEFAULT_MAX_TARGET_POSITIONS,
        layernorm_embedding=bool(getattr(args, "layernorm_embedding", False)),
        enc_final_norm=bool(args.encoder_normalize_before),
        dec_final_norm=bool(args.decoder_normalize_before),
        moe_freq=0 if stock else args.moe_freq, strata=strata, top1=bool(getattr(args, "moe_top1_expert", False)),
        stack=int(getattr(args, "moe_stack", 1) or 1), cmr=bool(getattr(args, "moe_cmr", False)),
        residual=getattr(args, "smoe_residual", "official"),
        strata_ffn=parse_widths(getattr(args, "smoe_strata_ffn", None)),
        exit_norm=bool(getattr(args, "smoe_exit_norm", False)),
    )


# ------------------------------------------------------------------------ building blocks


def _ln(d):
    return 2 * d


def _attn(d, kdim):
    return 2 * (d * d + d) + 2 * (kdim * d + d)  # q, out: d x d; k, v: kdim -> d


def _ffn(d, f):
    return 2 * d * f + f + d


def expected_passes(strata: Sequence[int]) -> float:
    """E[RC] under balanced top-1 routing: 1 + sum_{j < L-1} n_j / V_j (spec §1.7)."""
    visible = [sum(strata[j:]) for j in range(len(strata))]
    return 1.0 + sum(strata[j] / visible[j] for j in range(len(strata) - 1))


def visit_probabilities(strata: Sequence[int]) -> List[float]:
    """P(a token visits stratum s) under balanced routing: 1, then n_{s-1} / V_{s-1}."""
    visible = [sum(strata[j:]) for j in range(len(strata))]
    return [1.0] + [strata[j] / visible[j] for j in range(len(strata) - 1)]


def expert_sizes(s: Shape, d: int, f: int) -> List[int]:
    """Parameters of each expert of a slot, in expert order (stratum s's experts have width
    ``strata_ffn[s]``, else the side's FFN width)."""
    widths = s.strata_ffn or (f,) * len(s.strata)
    return [_ffn(d, w) for n, w in zip(s.strata, widths) for _ in range(n)]


def balanced_expert_use(s: Shape, d: int, f: int) -> float:
    """Expert parameters a token uses per slot under balanced routing: at every stratum j it
    visits (probability ``visit_probabilities``), k experts uniformly among the V_j it sees."""
    sizes = expert_sizes(s, d, f)
    first = [sum(s.strata[:j]) for j in range(len(s.strata))]
    return sum(p * s.k * sum(sizes[first[j]:]) / len(sizes[first[j]:])
               for j, p in enumerate(visit_probabilities(s.strata)))


def _slot(s: Shape, d: int, f: int, passes: Optional[float],
          use: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """(parameters, active parameters) of one MoE FFN slot. ``passes``: expert passes per
    token through the slot's routed layers (None: balanced expectation); ``use``: measured
    assignments computed per token by each expert (exact whatever the widths and drops)."""
    E, expert = sum(s.strata), _ffn(d, f)
    if s.stack > 1:
        params = _ln(d) + E * d + E * expert  # one pre-LN, N routers of E/N, E experts
        used = s.stack if passes is None else passes
        active = _ln(d) + E * d + s.k * used * expert
    else:
        L = len(s.strata)
        official_exit = s.residual == "official" and L > 1
        strata_norms = L - 1 + int(official_exit or s.exit_norm)
        routers = sum(d * sum(s.strata[j:]) for j in range(L))
        sizes = expert_sizes(s, d, f)
        params = _ln(d) + routers + strata_norms * _ln(d) + sum(sizes)
        if use is not None:
            experts_used = sum(u * size for u, size in zip(use, sizes))
        elif passes is not None and s.strata_ffn is None:
            experts_used = s.k * passes * expert
        elif passes is not None:  # measured passes, balanced choice among the visible widths
            experts_used = balanced_expert_use(s, d, f) * passes / expected_passes(s.strata)
        else:
            experts_used = balanced_expert_use(s, d, f)
        active = params - sum(sizes) + experts_used
    if s.cmr:
        params += (d + 1) + expert
        active += (d + 1) + expert
    return params, active


def _is_moe(i: int, moe_freq: int) -> bool:
    return moe_freq > 0 and (i + 1) % moe_freq == 0


def count(s: Shape, enc_passes: Optional[Sequence[float]] = None,
          dec_passes: Optional[Sequence[float]] = None, enc_use=None, dec_use=None) -> Tuple[int, float]:
    """(#params, forward FLOPs per token). ``*_passes``: measured expert passes per token of
    each MoE slot of that side, in layer order (None: balanced expectation); ``*_use``: per
    slot, measured assignments per token of each expert (exact expert FLOPs)."""
    params = active = 0.0
    # embeddings (positions: sinusoidal, no parameters, unless learned)
    emb = s.vocab * s.enc_dim + (0 if s.share_all else s.vocab * s.dec_dim)
    emb += 0 if s.share_dec_io else s.vocab * s.dec_dim  # untied output projection
    if s.learned_pos:
        emb += (s.max_src + 2) * s.enc_dim + (s.max_tgt + 2) * s.dec_dim
    if s.layernorm_embedding:
        emb += _ln(s.enc_dim) + _ln(s.dec_dim)
    params += emb
    active += emb
    for side, layers, d, f, cross, measured, use in (
        ("enc", s.enc_layers, s.enc_dim, s.enc_ffn, False, enc_passes, enc_use),
        ("dec", s.dec_layers, s.dec_dim, s.dec_ffn, True, dec_passes, dec_use),
    ):
        slot_index = 0
        for i in range(layers):
            attn = _attn(d, d) + _ln(d)
            if cross:
                attn += _attn(d, s.enc_dim) + _ln(d)
            params += attn
            active += attn
            if _is_moe(i, s.moe_freq):
                passes = None if measured is None else measured[slot_index]
                slot_use = None if use is None else use[slot_index]
                slot_index += 1
                p, a = _slot(s, d, f, passes, slot_use)
            else:
                p = a = _ffn(d, f) + _ln(d)
            params += p
            active += a
        if measured is not None and slot_index != len(measured):
            raise ValueError(f"{side}: {len(measured)} measured slots for {slot_index} MoE slots")
        final = _ln(d) if (s.enc_final_norm if side == "enc" else s.dec_final_norm) else 0
        params += final
        active += final
    n_ctx = s.max_src + s.max_tgt
    flops = (2 * active + 2 * s.dec_dim * s.vocab
             + 2 * n_ctx * (s.enc_layers * s.enc_dim + s.dec_layers * s.dec_dim))
    return int(round(params)), flops


# ------------------------------------------------------------------------ flags -> shape


def parse_model_args(flags: Sequence[str]):
    """fairseq's own parsing (and architecture defaults) of a recipe's flags; builds nothing."""
    import fairseq_smoe  # noqa: F401  (registers the model, task and criterion)
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=["DATA", *flags])


def config_shape(name: str, vocab: int) -> Shape:
    flags, _settings = load_config(name)
    return shape_from_args(parse_model_args(flags), vocab)


# ------------------------------------------------------------------------ measured passes


def measure_passes(model, task, subset: str = "valid", max_tokens: int = 4096, cuda: bool = False,
                   with_use: bool = False):
    """Mean passes per routed token of every MoE slot (teacher forcing on ``subset``):
    ({'encoder': [...], 'decoder': [...]}, tokens seen). A stacked slot's passes are the sum
    over its layers (1 each). ``with_use``: also (third) each one-block slot's assignments per
    routed token of each expert (None for stacked slots)."""
    import torch
    from fairseq import utils

    from .modules.stats import recording

    model.eval()
    slots = {side: [i for i, layer in enumerate(getattr(model, side).layers) if hasattr(layer, "moe")]
             for side in ("encoder", "decoder")}
    sums = {side: {i: [0.0, 0.0] for i in layers} for side, layers in slots.items()}
    rows = {side: {i: None for i in layers} for side, layers in slots.items()}
    task.load_dataset(subset)
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
    ).next_epoch_itr(shuffle=False)
    seen = 0
    with torch.no_grad():
        for sample in itr:
            if cuda:
                sample = utils.move_to_cuda(sample)
            with recording() as record:
                model(**sample["net_input"])
            seen += int(sample["ntokens"])
            for entry in record.entries:  # one slot: its blocks' passes over its tokens
                acc = sums[entry.side][entry.layer]
                for b in entry.stats.blocks:
                    acc[0] += float(b.passes_TB.sum())
                acc[1] += float(entry.stats.blocks[0].routed_TB.sum())
                if len(entry.stats.blocks) == 1:
                    got = entry.stats.blocks[0].expert_rows
                    old = rows[entry.side][entry.layer]
                    rows[entry.side][entry.layer] = got if old is None else [a + b for a, b in zip(old, got)]
    use = {side: [None if rows[side][i] is None else [r / max(sums[side][i][1], 1) for r in rows[side][i]]
                  for i in slots[side]] for side in slots}
    sums = {side: [acc[i] for i in slots[side]] for side, acc in sums.items()}
    passes = {side: [p / t if t else 0.0 for p, t in acc] for side, acc in sums.items()}
    if with_use:
        return passes, seen, use
    return passes, seen


@errors.missing_files_are_user_errors()
def checkpoint_cost(checkpoint: str, data: str, vocab: Optional[int], subset: str,
                    max_tokens: int, cpu: bool):
    """(label, #params, FLOPs/tok with measured passes) of a trained checkpoint."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_smoe  # noqa: F401

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data}
    )
    model = models[0]
    from fairseq.models.transformer import TransformerModel

    if stock_model(cfg.model) is not None and not isinstance(model, TransformerModel):
        raise CheckpointError(f"--checkpoint {checkpoint} is {stock_model(cfg.model)}, not a transformer: "
                              f"the count covers transformer encoder-decoders only")
    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        model.cuda()
    args = cfg.model
    if vocab is None:
        vocab = model.decoder.embed_tokens.num_embeddings
    shape = shape_from_args(args, vocab)
    if shape.moe_freq <= 0:
        passes = {"encoder": [], "decoder": []}
        use = {"encoder": None, "decoder": None}
    else:
        passes, _, use = measure_passes(model, task, subset, max_tokens, cuda, with_use=True)
        use = {side: (u if all(x is not None for x in u) else None) for side, u in use.items()}
    params, flops = count(shape, passes["encoder"], passes["decoder"], use["encoder"], use["decoder"])
    return params, flops, passes


# ------------------------------------------------------------------------ CLI


def human(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    return f"{n / 1e6:.1f}M"


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fairseq_smoe.cost",
        description="#params and forward FLOPs per token of recipes (configs/<bench>/<system>), "
        "counted analytically as the paper does (see the module docstring)")
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="e.g. m4/smoe-2-2-2-2 m15/moe (or paths to .conf files)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"shared vocabulary size (default: {DEFAULT_VOCAB}, the paper's; with "
                   f"--checkpoint: the checkpoint's dictionary)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {config, params, flops_per_token}")
    p.add_argument("--checkpoint", help="count with the passes per token measured by running "
                   "this checkpoint on --data (its own flags are used; CONFIG is only a label)")
    p.add_argument("--data", help="prepared data directory (data-bin/ inside, or a data-bin)")
    p.add_argument("--subset", default="valid", help="split to measure on (default: valid)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--cpu", action="store_true", help="measure on CPU even with a GPU")
    a = p.parse_args(argv)

    rows = []
    if a.vocab_size is not None and a.vocab_size < 1:
        raise CostError(f"--vocab-size {a.vocab_size}: the shared vocabulary must hold at least one entry "
                        f"(default {DEFAULT_VOCAB}, the paper's)")
    if a.checkpoint:
        if not a.data:
            p.error("--checkpoint needs --data DATA_DIR")
        if len(a.configs) > 1:
            p.error("--checkpoint measures one model: give at most one CONFIG (a label)")
        if a.max_tokens < 1:
            raise CostError(f"--max-tokens {a.max_tokens}: a batch must hold at least one token (default 4096)")
        data = _data_bin(a.data)
        params, flops, passes = checkpoint_cost(
            a.checkpoint, data, a.vocab_size, a.subset, a.max_tokens, a.cpu)
        label = a.configs[0] if a.configs else a.checkpoint
        rows.append((label, params, flops, _mean(passes)))
    else:
        if not a.configs:
            p.error("give at least one CONFIG (e.g. m4/smoe-4-4), or --checkpoint")
        vocab = a.vocab_size or DEFAULT_VOCAB
        for name in a.configs:
            shape = config_shape(name, vocab)
            params, flops = count(shape)
            rc = None
            if shape.moe_freq > 0:
                rc = expected_passes(shape.strata) if shape.stack == 1 else float(shape.stack)
            rows.append((name, params, flops, rc))

    if a.json:
        print(json.dumps([{"config": n, "params": pr, "flops_per_token": int(round(f))}
                          for n, pr, f, _ in rows], indent=1))
        return
    mode = "measured" if a.checkpoint else "balanced routing"
    print(f"{'config':<28} {'#params':>9} {'FLOPs/tok':>10} {'passes/slot':>12}  ({mode})")
    for name, pr, f, rc in rows:
        rc_s = "-" if rc is None else f"{rc:.3f}"
        print(f"{name:<28} {human(pr):>9} {human(f):>10} {rc_s:>12}")


def _mean(passes):
    values = [v for side in passes.values() for v in side]
    return sum(values) / len(values) if values else None


def _data_bin(data: str) -> str:
    from pathlib import Path

    path = Path(data)
    if (path / "data-bin").is_dir():
        return str(path / "data-bin")
    if not path.is_dir():
        raise CostError(f"--data {data} is not a directory")
    return str(path)


if __name__ == "__main__":
    main()
