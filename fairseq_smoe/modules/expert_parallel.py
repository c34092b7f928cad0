"""Expert parallelism: the experts of every SMoE block split over the ranks of the job.

Layout (``ep_layout``, a pure function): with W ranks and E experts,
* W <= E (W must divide E): one exchange group of all W ranks; rank r holds experts
  ``r*E/W .. (r+1)*E/W - 1``;
* W > E (E must divide W): W/E exchange groups of E consecutive ranks, each holding every
  expert once (rank r holds expert r % E); the W/E copies of an expert form its replica group,
  whose gradients are summed (the official code's replication).
Routers, norms, attention and embeddings stay data parallel.

What moves, per strata pass (``ExpertParallel``): one small ``all_gather`` in the exchange group
of every rank's per-expert loads, rows going to each later stratum and routed rows (host-read
once: it sizes the exchange, lets every rank apply each sender's own capacity, and keeps the
strata loop in lockstep), then ``all_to_all_single`` of the kept expert rows to their owners and
of the outputs back (and the reverse in backward): only kept assignments travel, as
``[rows, d]``, with per-rank split sizes; nothing is padded to a capacity and nothing is
one-hot. Capacity is the official code's per-rank one: computed from the rank's own tokens at
that stratum.

Gradients: an expert's gradient is computed on its owner from every rank's tokens, i.e. it is
already the sum over the data-parallel ranks. fairseq's ``legacy_ddp`` skips parameters tagged
``expert`` and the trainer multiplies every gradient by ``W / sample_size``, so the expert
gradients are divided by W here (``finish_expert_grads``), after summing the replicas.
"""

import datetime
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from .host_sync import read_to_host

DEFAULT_TIMEOUT_S = 300
DEFAULT_SAVE_TIMEOUT_S = 1800  # --moe-save-timeout: how long the other ranks wait for rank 0's write
# NCCL: the expert-parallel groups' own timeout (what torch's watchdog enforces, by aborting the
# process with its own message) is --moe-ep-timeout plus this, so that the host-side wait of
# ``gather_counts``, which raises our one-line error, runs out first
NCCL_WATCHDOG_GRACE_S = 60


class ExpertParallelError(RuntimeError):
    """A collective of expert parallelism failed: a peer rank died, stalled past the timeout, or
    the ranks disagree. The message names the collective, the ranks, the elapsed time, the
    timeout and what to do."""


class SaveWaitError(ExpertParallelError):
    """A rank waited longer than --moe-save-timeout for rank 0 to finish writing a checkpoint
    (or rank 0 died meanwhile)."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    # gloo's own advice ("This is typically caused by a remote worker hanging ...") is what the
    # message says next, in the terms of this job
    return lines[0].split(" This is typically caused")[0] if lines else type(err).__name__


def collective_failure(what: str, ranks, elapsed_s: float, timeout_s: int, err: BaseException) -> str:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (
        f"expert parallelism: {what} among ranks {', '.join(map(str, ranks))} failed on rank {rank} after "
        f"{elapsed_s:.1f}s (--moe-ep-timeout {timeout_s}s): {_first_line(err)}. A peer rank died or stopped "
        f"responding (read its log); this rank stops too. Restart the job with the same command and "
        f"--save-dir (scripts/train.sh resumes from SAVE_DIR/checkpoint_last.pt)"
    )


def apply_job_timeout(timeout_s: int) -> None:
    """Give the job's default process group and fairseq's global group (whose collectives are
    the gradient all-reduce and the statistics sync) the expert-parallel timeout, so that a rank
    that stops answering fails every peer within ``timeout_s`` instead of torch's defaults (30
    minutes for gloo, 10 for NCCL). Every rank calls it, in the same order."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    from fairseq.distributed import utils as fairseq_dist

    if not hasattr(fairseq_dist.get_global_group, "_global_group"):
        fairseq_dist.get_global_group._global_group = dist.new_group(timeout=timeout)
    elif set_timeout is not None:
        set_timeout(timeout, fairseq_dist.get_global_group._global_group)
    if set_timeout is not None:  # torch >= 2.3
        set_timeout(timeout)


_SAVE_GROUPS: Dict[Tuple[int, int], object] = {}
_SAVE_WAIT: List = []  # [(group, timeout_s)] of this job, once set up
_SAVE_SENT: List = []  # rank 0: (work, tensor) of its "written" messages not yet received


def setup_save_wait(timeout_s: int) -> None:
    """A gloo group of every rank, with ``timeout_s`` (--moe-save-timeout), for ``save_wait``. Every
    rank calls it, in the same order (it creates a process group); a no-op with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    key = (dist.get_world_size(), timeout_s)
    if key not in _SAVE_GROUPS:
        _SAVE_GROUPS[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _SAVE_WAIT[:] = [(_SAVE_GROUPS[key], timeout_s)]


def save_wait() -> None:
    """Every rank, right after fairseq's save_checkpoint: the others wait for rank 0's write.

    Without it they go on to the next step and wait for rank 0 inside its first collective, whose
    timeout is --moe-ep-timeout (300 s; expert parallelism sets it for the whole job): a
    consolidated M15 checkpoint (~10 GB) on a slow disk would kill the job. Here rank 0, its write
    done, sends every other rank a message without waiting for it (``isend``), and each of them
    waits for that message in a gloo group of its own whose timeout is --moe-save-timeout: gloo's
    receive blocks the host and raises on its timeout, also in a job whose collectives are NCCL.
    Rank 0 itself waits for nobody here, so a peer that died or stalled meanwhile is still found
    within --moe-ep-timeout, by the next collective."""
    if not _SAVE_WAIT:
        return
    group, timeout_s = _SAVE_WAIT[0]
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        _SAVE_SENT[:] = [(w, t) for w, t in _SAVE_SENT if not w.is_completed()]
        for dst in range(1, world):
            t = torch.ones(1)
            _SAVE_SENT.append((dist.isend(t, dst=dst, group=group), t))
        return
    start = time.monotonic()
    try:
        dist.recv(torch.zeros(1), src=0, group=group)
    except RuntimeError as err:
        raise SaveWaitError(
            f"a collective of the distributed job failed on rank {rank}: its wait for rank 0 to finish writing "
            f"the checkpoint (--moe-save-timeout {timeout_s}s) ended after {time.monotonic() - start:.1f}s: "
            f"{_first_line(err)}. A peer rank died or stopped responding (read rank 0's log), or rank 0 was "
            f"still writing: then the disk is slower than that, raise --moe-save-timeout (or use "
            f"--moe-sharded-checkpoint, which writes no consolidated file). This rank stops too. Restart the "
            f"job with the same command and --save-dir to resume from checkpoint_last.pt") from err


@dataclass(frozen=True)
class Layout:
    """Where experts live (pure data, no process group)."""

    num_experts: int  # E
    world_size: int  # W
    rank: int
    group_ranks: Tuple[int, ...]  # the exchange group of this rank, in group-rank order
    replica_ranks: Tuple[int, ...]  # ranks holding the same experts as this one (itself included)

    @property
    def group_size(self) -> int:
        return len(self.group_ranks)

    @property
    def group_rank(self) -> int:
        return self.group_ranks.index(self.rank)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.group_size

    @property
    def local_experts(self) -> Tuple[int, int]:
        """Global ids ``[lo, hi)`` of the experts this rank holds."""
        lo = self.group_rank * self.experts_per_rank
        return lo, lo + self.experts_per_rank

    def owner(self, expert: int) -> int:
        """Group rank holding global expert ``expert``."""
        return expert // self.experts_per_rank


def valid_world_sizes(num_experts: int, up_to: int = 64) -> List[int]:
    return [w for w in range(1, up_to + 1) if num_experts % w == 0 or w % num_experts == 0]


def ep_layout(num_experts: int, world_size: int, rank: int) -> Layout:
    """The expert layout of ``rank`` in a job of ``world_size`` ranks (see the module doc)."""
    E, W = num_experts, world_size
    if not (E % W == 0 or W % E == 0):
        raise ConfigError(
            f"--moe-expert-parallel splits the {E} experts of each SMoE block over the {W} ranks "
            f"of the job: W must divide E (E/W experts per rank) or E divide W (each expert "
            f"replicated W/E times); {E} experts and {W} ranks do neither. Valid world sizes for "
            f"{E} experts: {', '.join(map(str, valid_world_sizes(E)))}, ... (multiples of {E})"
        )
    G = min(E, W)
    start = (rank // G) * G
    group = tuple(range(start, start + G))
    replicas = tuple(range(rank % G, W, G))
    return Layout(E, W, rank, group, replicas)


def split_sizes(counts_V: List[int], first: int, layout: Layout) -> List[int]:
    """Rows per group rank, for rows sorted by visible expert ``first .. E-1`` with ``counts_V``
    rows each (a rank's experts are a contiguous id range, so its rows are contiguous)."""
    out = [0] * layout.group_size
    for j, c in enumerate(counts_V):
        out[layout.owner(first + j)] += c
    return out


def received_chunks(peer_counts: List[List[int]], first: int, layout: Layout) -> List[Tuple[int, int]]:
    """(local expert index, rows) of what this rank receives, in arrival order: from group rank
    0, 1, ... the rows of its visible local experts, expert by expert."""
    lo, hi = layout.local_experts
    chunks = []
    for counts_V in peer_counts:
        for e in range(max(lo, first), hi):
            chunks.append((e - lo, counts_V[e - first]))
    return chunks


_GROUPS: Dict[Tuple[int, int, int], "ExpertParallel"] = {}


class ExpertParallel:
    """The process groups and collectives of expert parallelism for E experts (one per E and
    job, shared by all blocks; see ``for_job``)."""

    def __init__(self, layout: Layout, group, replica_group, timeout_s: int):
        self.layout = layout
        self.group = group
        self.replica_group = replica_group
        self.timeout_s = timeout_s
        # asynchronous backends (NCCL): the counts' gather is waited for on the host (_wait_on_host);
        # gloo's blocking call already raises on the group's timeout, in gloo's own words
        self.host_wait = group is not None and dist.get_backend(group) != "gloo"

    @staticmethod
    def for_job(num_experts: int, timeout_s: int = DEFAULT_TIMEOUT_S) -> Optional["ExpertParallel"]:
        """The expert-parallel setup of this job, or None with a single process. Every rank must
        call this in the same order (it creates process groups)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        W, rank = dist.get_world_size(), dist.get_rank()
        key = (num_experts, W, timeout_s)
        if key not in _GROUPS:
            layout = ep_layout(num_experts, W, rank)
            grace = NCCL_WATCHDOG_GRACE_S if dist.get_backend() == "nccl" else 0
            timeout = datetime.timedelta(seconds=timeout_s + grace)
            G = layout.group_size
            group = replica_group = None
            for start in range(0, W, G):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(start, start + G)), timeout=timeout)
                if rank in range(start, start + G):
                    group = g
            if W > G:
                for first in range(G):
                    g = dist.new_group(list(range(first, W, G)), timeout=timeout)
                    if rank % G == first:
                        replica_group = g
            _GROUPS[key] = ExpertParallel(layout, group, replica_group, timeout_s)
        return _GROUPS[key]

    # -- per pass -----------------------------------------------------------------------------

    def _run(self, what: str, ranks, fn, *args, **kwargs):
        """A collective; its failure becomes one ExpertParallelError naming what failed."""
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            if isinstance(err, ExpertParallelError):
                raise
            raise ExpertParallelError(
                collective_failure(what, ranks, time.monotonic() - start, self.timeout_s, err)) from err

    def _wait_on_host(self, collective, *args, **kwargs) -> None:
        """``collective`` launched asynchronously, then waited for on the host for at most
        --moe-ep-timeout. Under NCCL a collective returns at once and a dead peer is otherwise
        noticed by torch's watchdog, which aborts the process with its own message before ours, or
        by the host read that follows blocking for ever; ``Work.wait(timeout)`` blocks the host and
        raises on the timeout (and on gloo waits as the blocking call would). Every earlier
        collective of the group (this pass's exchanges) precedes it on the same stream, so a peer
        lost in any of them is reported here, within the timeout. No extra synchronisation: the
        counts are read to the host right after. Not run on NCCL in this project (no GPU): on gloo
        (``host_wait`` forced, tests/test_ddp.py) it raises after the timeout as it should."""
        work = collective(*args, async_op=True, **kwargs)
        work.wait(datetime.timedelta(seconds=self.timeout_s))

    def gather_counts(self, local_X: Tensor) -> List[List[int]]:
        """Every group rank's count vector (same length on all), read to the host once."""
        parts = [torch.empty_like(local_X) for _ in range(self.layout.group_size)]
        gather = (self._wait_on_host, dist.all_gather) if self.host_wait else (dist.all_gather,)
        self._run("all_gather of the per-expert counts", self.layout.group_ranks,
                  *gather, parts, local_X.contiguous(), group=self.group)
        X = local_X.numel()
        flat = read_to_host(torch.cat(parts))
        return [flat[i * X:(i + 1) * X] for i in range(self.layout.group_size)]

    def exchange(self, rows: Tensor, send: List[int], recv: List[int]) -> Tensor:
        """``all_to_all_single`` of ``rows`` (``[sum(send), d]``) in the exchange group."""
        out = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
        self._run(f"all_to_all_single of {sum(send)} expert rows", self.layout.group_ranks,
                  dist.all_to_all_single, out, rows.contiguous(), output_split_sizes=recv,
                  input_split_sizes=send, group=self.group)
        return out

    # -- after backward -------------------------------------------------------------------------

    def finish_expert_grads(self, grads: List[Optional[Tensor]]) -> None:
        """Sum the replicas' gradients (when experts are replicated), then divide by the
        data-parallel world size (see the module doc), in place."""
        W = self.layout.world_size
        for g in grads:
            if g is None:
                continue
            if self.replica_group is not None:
                self._run("all_reduce of the expert replicas' gradients", self.layout.replica_ranks,
                          dist.all_reduce, g, group=self.replica_group)
            g.div_(W)
