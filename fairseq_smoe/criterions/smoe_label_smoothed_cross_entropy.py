"""Label-smoothed cross-entropy plus the SMoE balance loss, with routing statistics.

loss = LS-CE summed over target tokens + moe_gate_loss_wt * sample_size * mean over SMoE
blocks of each block's balance loss (itself averaged over the block's passes), spec §2,
+ for CMR models cmr_gate_loss_wt * sample_size * |sum of CMR gates / #tokens - cmr_gate_loss_p|
(sums over every CMR slot and every non-padding token of the batch, spec §1.10).

The statistics come only from the forward being scored: the model returns them as the
``RoutingRecord`` in its output (``extra["routing"]``, modules/stats.py). A block skipped by
layerdrop is not in the record and contributes nothing: the gate term is the mean over the
blocks that ran (no term when none ran), and the logged passes count only those blocks.
"""

import math
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from ..modules.stats import mean_balance_loss

DIRECTION_KEY = "direction"  # sample[DIRECTION_KEY]: [B] direction ids, set by smoe_translation


@dataclass
class SMoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_wt: float = field(
        default=0.01, metadata={"help": "weight of the SMoE balance loss (paper: 0.01)"}
    )
    cmr_gate_loss_wt: float = field(
        default=0.01,
        metadata={"help": "weight of the CMR budget loss |mean gate - p| (paper: 0.01); "
                  "only used by models with --moe-cmr"},
    )
    cmr_gate_loss_p: float = field(
        default=0.8,
        metadata={"help": "CMR budget: target mean gate, the share of the MoE in the mix "
                  "(paper: 0.8)"},
    )


def cmr_gate_loss(cmr_stats, p: float):
    """(|sum g / #tokens - p|, sum g, #tokens) over the CMR slots that ran; the gate sum keeps
    its grad."""
    gate_sum = torch.stack([c.gate_sum for c in cmr_stats]).sum()
    count = torch.stack([torch.as_tensor(c.gate_count, device=gate_sum.device) for c in cmr_stats]).sum()
    return (gate_sum / count.clamp_min(1) - p).abs(), gate_sum, count


def routing_record(net_output):
    """The ``RoutingRecord`` of this forward (``extra["routing"]``), or None for a model that
    has none (not an smoe_transformer)."""
    extra = net_output[1] if isinstance(net_output, (tuple, list)) and len(net_output) > 1 else None
    return extra.get("routing") if isinstance(extra, dict) else None


@register_criterion("smoe_label_smoothed_cross_entropy", dataclass=SMoELabelSmoothedCrossEntropyConfig)
class SMoELabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0,
                 report_accuracy=False, moe_gate_loss_wt=0.01, cmr_gate_loss_wt=0.01,
                 cmr_gate_loss_p=0.8):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        for flag, value, ok, domain in (
            ("--moe-gate-loss-wt", moe_gate_loss_wt, moe_gate_loss_wt >= 0, ">= 0"),
            ("--cmr-gate-loss-wt", cmr_gate_loss_wt, cmr_gate_loss_wt >= 0, ">= 0"),
            ("--cmr-gate-loss-p", cmr_gate_loss_p, 0 <= cmr_gate_loss_p <= 1, "in [0, 1] (a mean gate)"),
        ):
            if not ok:
                raise ValueError(f"{flag} must be {domain}, got {value}")
        self.moe_gate_loss_wt = moe_gate_loss_wt
        self.cmr_gate_loss_wt = cmr_gate_loss_wt
        self.cmr_gate_loss_p = cmr_gate_loss_p

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss_tok, nll_tok = self.compute_loss(model, net_output, sample, reduce=False)
        loss, nll_loss = loss_tok.sum(), nll_tok.sum()
        bsz = sample["target"].size(0)
        sample_size = bsz if self.sentence_avg else sample["ntokens"]

        log = {
            "ntokens": sample["ntokens"],
            "nsentences": bsz,
            "sample_size": sample_size,
        }
        record = routing_record(net_output)
        enc = record.blocks("encoder") if record is not None else []
        dec = record.blocks("decoder") if record is not None else []
        if record is not None:
            gate_loss = mean_balance_loss(enc + dec)
            if gate_loss is not None:
                loss = loss + self.moe_gate_loss_wt * sample_size * gate_loss
            log["moe_gate_loss"] = 0.0 if gate_loss is None else gate_loss.detach() * sample_size
            log["moe_gate_weight"] = 0 if gate_loss is None else sample_size
            for side, blocks in (("enc", enc), ("dec", dec)):
                log[f"rc_{side}_passes"] = sum(b.passes_TB.sum() for b in blocks) if blocks else 0
                log[f"rc_{side}_tokens"] = sum(b.routed_TB.sum() for b in blocks) if blocks else 0
            log["moe_dropped"] = sum(b.dropped for b in enc + dec)
            log["moe_assigned"] = sum(b.assigned for b in enc + dec)
            cmr = record.cmr()
            if cmr:
                cmr_loss, gate_sum, gate_count = cmr_gate_loss(cmr, self.cmr_gate_loss_p)
                loss = loss + self.cmr_gate_loss_wt * sample_size * cmr_loss
                log["cmr_gate_loss"] = cmr_loss.detach() * sample_size
                log["cmr_gate_sum"] = gate_sum.detach()
                log["cmr_gate_count"] = gate_count
        log["loss"], log["nll_loss"] = loss.data, nll_loss.data

        if DIRECTION_KEY in sample:
            log.update(self._per_direction(sample, loss_tok, enc, dec))
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            log["n_correct"], log["total"] = n_correct.item(), total.item()
        return loss, sample_size, log

    def _per_direction(self, sample, loss_tok, enc, dec):
        """Per-direction sums (loss, target tokens, passes) for the validation log."""
        dir_B = sample[DIRECTION_KEY]
        names = self.task.direction_names
        D, B = len(names), dir_B.numel()

        def per_dir(values_B):
            return torch.zeros(D, dtype=torch.float64, device=dir_B.device).index_add_(
                0, dir_B, values_B.double()
            )

        sums = {
            "loss": per_dir(loss_tok.view(B, -1).sum(1).detach()),
            "ntok": per_dir(sample["target"].ne(self.padding_idx).sum(1)),
        }
        for side, blocks in (("enc", enc), ("dec", dec)):
            if blocks:
                sums[f"rc_{side}_passes"] = per_dir(sum(b.passes_TB.sum(0) for b in blocks))
                sums[f"rc_{side}_tokens"] = per_dir(sum(b.routed_TB.sum(0) for b in blocks))
        return {f"dir_{k}:{name}": v[i] for k, v in sums.items() for i, name in enumerate(names)}

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        sample_size = total("sample_size")
        if any("moe_gate_loss" in log for log in logging_outputs):
            weight = total("moe_gate_weight")
            if weight > 0:
                metrics.log_scalar("moe_gate_loss", total("moe_gate_loss") / weight, weight, round=4)
            for side in ("enc", "dec"):
                tokens = total(f"rc_{side}_tokens")
                if tokens > 0:
                    metrics.log_scalar(f"rc_{side}", total(f"rc_{side}_passes") / tokens, tokens, round=3)
            assigned = total("moe_assigned")
            if assigned > 0:
                metrics.log_scalar("dropped", total("moe_dropped") / assigned, assigned, round=4)
        if any("cmr_gate_loss" in log for log in logging_outputs) and sample_size > 0:
            metrics.log_scalar("cmr_gate_loss", total("cmr_gate_loss") / sample_size, sample_size, round=4)
            gates = total("cmr_gate_count")
            if gates > 0:
                metrics.log_scalar("cmr_gate", total("cmr_gate_sum") / gates, gates, round=4)

        names = sorted({k.split(":", 1)[1] for log in logging_outputs for k in log if k.startswith("dir_ntok:")})
        for name in names:
            ntok = total(f"dir_ntok:{name}")
            if ntok == 0:
                continue
            metrics.log_scalar(f"loss_{name}", total(f"dir_loss:{name}") / ntok / math.log(2), ntok, round=3)
            for side in ("enc", "dec"):
                tokens = total(f"dir_rc_{side}_tokens:{name}")
                if tokens > 0:
                    metrics.log_scalar(f"rc_{side}_{name}", total(f"dir_rc_{side}_passes:{name}") / tokens, tokens, round=3)
