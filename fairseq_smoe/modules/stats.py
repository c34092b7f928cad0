"""Routing statistics as one explicit record per forward.

An SMoE block returns what it measured (``BlockStats``) next to its output; nothing is kept on
the module between forwards. The fairseq layers around a block hand those statistics to the
``RoutingRecord`` that is open for the current forward (``recording``); the model opens one per
``forward`` and returns it as ``extra["routing"]`` of the decoder output, and the criterion
reads only that record. Consequences, by construction:

* a layer skipped by layerdrop adds nothing, so it cannot leave a stale graph behind;
* with activation checkpointing the statistics are the outputs of the checkpointed function
  and keep their gradient (the recomputation in backward adds nothing: no record is open then);
* a forward with no open record (e.g. the incremental decoder steps of fairseq-generate)
  computes the statistics and drops them; open a record around any forward to keep them::

      with recording(detail=True) as rec:
          model(**sample["net_input"])
      rec.blocks("encoder")[0].passes_TB

``detail=True`` additionally keeps, per pass, which rows were routed, the chosen experts, which
assignments were computed and the router probabilities (``PassTrace``), for routing analysis.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Union

import torch
from torch import Tensor


@dataclass
class PassTrace:
    """One pass of one block (kept only by ``recording(detail=True)``); all tensors detached.

    ``rows_n``: the block's rows routed at this pass, as indices into its N = T*B time-major
    rows (row t*B + b), or None for every row (pass 0); ``experts_Kn``: global expert ids of
    the K choices (first choice first); ``kept_Kn``: the assignment was computed (not dropped by
    capacity, not a padding row, not a second expert dropped by the ``random`` policy);
    ``probs_nV``: router probabilities over the visible experts ``first .. E-1`` (fp32)."""

    stratum: int
    first: int
    rows_n: Optional[Tensor]
    experts_Kn: Tensor
    kept_Kn: Tensor
    probs_nV: Tensor


@dataclass
class BlockStats:
    """What one forward of one SMoE block measured.

    ``aux_loss``: balance loss averaged over the passes run (scalar, keeps its gradient);
    ``passes_TB``: passes per token (0 for tokens that are not routed); ``routed_TB``: which
    tokens were routed; ``dropped`` / ``assigned``: expert assignments dropped by capacity /
    made (host ints: the passes' plans count them anyway); ``trace``: per-pass detail, or None;
    ``expert_rows``: per global expert, the assignments it computed over all passes (host ints;
    the exact expert FLOPs of the forward, whatever the experts' widths)."""

    aux_loss: Tensor
    passes_TB: Tensor
    routed_TB: Tensor
    dropped: int
    assigned: int
    trace: Optional[List[PassTrace]] = None
    expert_rows: List[int] = field(default_factory=list)  # per global expert: rows it computed


@dataclass
class CMRStats:
    """One forward of one CMR slot: the sum of its gates over counted tokens (with grad, for the
    budget loss) and the number of counted tokens (non-padding unless padding is routed)."""

    gate_sum: Tensor
    gate_count: Tensor


@dataclass
class SlotStats:
    """One forward of one MoE FFN slot: its blocks in order (one for an SMoE block, N for a
    stack of N plain MoE layers) and its CMR gate statistics if it is a CMR slot."""

    blocks: List[BlockStats]
    cmr: Optional[CMRStats] = None

    @staticmethod
    def of(stats: Union["SlotStats", BlockStats]) -> "SlotStats":
        """A slot's statistics from what its module returned (a bare block returns BlockStats)."""
        return stats if isinstance(stats, SlotStats) else SlotStats([stats])


@dataclass
class SlotEntry:
    side: str  # "encoder" or "decoder"
    layer: int  # 0-based layer index in its stack
    stats: SlotStats


@dataclass
class RoutingRecord:
    """The statistics of every MoE slot that ran during one forward, in the order they ran."""

    detail: bool = False
    entries: List[SlotEntry] = field(default_factory=list)

    def add(self, side: str, layer: int, stats: SlotStats) -> None:
        self.entries.append(SlotEntry(side, layer, stats))

    def blocks(self, side: Optional[str] = None) -> List[BlockStats]:
        """Every block forward recorded on ``side`` (or both), in the order they ran."""
        return [b for e in self.entries if side in (None, e.side) for b in e.stats.blocks]

    def cmr(self) -> List[CMRStats]:
        return [e.stats.cmr for e in self.entries if e.stats.cmr is not None]

    def __len__(self) -> int:
        return len(self.entries)


_OPEN: ContextVar[Optional[RoutingRecord]] = ContextVar("smoe_routing_record", default=None)


def current_record() -> Optional[RoutingRecord]:
    """The record open for the forward running now, or None."""
    return _OPEN.get()


@contextmanager
def recording(record: Optional[RoutingRecord] = None, detail: bool = False) -> Iterator[RoutingRecord]:
    """Open ``record`` (a new one by default) for the forwards run inside the block."""
    record = RoutingRecord(detail=detail) if record is None else record
    token = _OPEN.set(record)
    try:
        yield record
    finally:
        _OPEN.reset(token)


def mean_balance_loss(blocks: List[BlockStats]) -> Optional[Tensor]:
    """Mean of the blocks' balance losses (each already averaged over its passes), or None."""
    if not blocks:
        return None
    return torch.stack([b.aux_loss.float() for b in blocks]).mean()
