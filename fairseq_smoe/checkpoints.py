"""Checkpoints of expert-parallel training that load at any world size.

With ``--moe-expert-parallel`` each rank holds only its experts ``[lo, hi)`` of each SMoE block
(``StackedExperts``: ``w1 [hi-lo, ffn, d]``, ``b1``, ``w2``, ``b2``) and their optimizer state.
fairseq saves on rank 0 only, so without help a checkpoint would hold rank 0's experts. Here:

**Consolidated (default).** At every save all ranks take part: each expert tensor and each of
its optimizer-state tensors of the same shape (Adam's ``exp_avg``, ``exp_avg_sq``, ...) are
gathered to rank 0 (``dist.gather`` in the first exchange group, one tensor at a time), and
rank 0 writes a fairseq checkpoint whose keys and shapes are exactly those of a non-expert-
parallel run: ``[E, ...]`` experts, optimizer state indexed by parameter position as torch
packs it. It loads anywhere a checkpoint loads (``fairseq-generate`` in one process,
``fairseq-train`` at any world size with or without ``--moe-expert-parallel``).

**Sharded (``--moe-sharded-checkpoint``).** Nothing is gathered. Every checkpoint name
(``checkpoint_last.pt``, ``checkpoint_1_500.pt``, ...) is a small JSON **index**; the data lives in
one file per expert-holding rank of the first exchange group, ``ep-shard.u{updates}.{save id}.
{r}-of-{G}.pt`` next to it. Shard 0 is rank 0's fairseq checkpoint (everything but the other
ranks' experts); shard r > 0 holds rank r's expert tensors and their optimizer state. The index
records the run id, the save id, the update, the world size, experts per block and per shard,
and each file's rank, expert range, size and SHA-256. Shards are written before the index
(rank 0 writes the index last, atomically), several index names of one save share its shards,
and shards no index in the save directory refers to are removed after each save, so a kill at
any moment leaves the previous index and its files intact. An index loads wherever a
consolidated file does (it is assembled in memory; each expert-parallel rank reads shard 0 and
the shards holding its experts only).

**Loading at another world size.** An expert-parallel rank takes its slice ``[lo, hi)`` of every
expert tensor and of the same optimizer-state tensors (every rank reads the checkpoint itself,
memory-mapped, so the ranks of a node share the page cache: ``load_checkpoint_on_all_dp_ranks``
is forced, since fairseq's broadcast of rank 0's state cannot hand out per-rank slices; with
``--reset-optimizer`` the optimizer state is dropped unread). Every optimizer-state tensor is checked against its
parameter's shape (torch's optimizer loader does not check), so state of another model never
loads silently. The epoch iterator's position is rescaled to the new world size (fairseq
counts batches per rank; ``iterations_in_epoch x W_saved / W_now``), so the resumed run sees
the batches the saved run had not.

Every checkpoint a plugin model saves carries ``extra_state["smoe_parallel"]``: run id, world
size, expert-parallel or not, experts per block, the parameter names in optimizer order and the
expert parameter names (what the command line tool needs to split optimizer state without
building the model).

Command line: ``python -m fairseq_smoe.checkpoints {consolidate,reshard,check}``.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import errors
from .checkpoint_io import CheckpointError, atomic_write
from .modules.experts import LAYOUT_KEY, is_expert_weight

logger = logging.getLogger(__name__)

META = "smoe_parallel"  # key in extra_state
INDEX_FORMAT = "fairseq-smoe shard index"
SHARD_FORMAT = "fairseq-smoe shard"
VERSION = 1
SHARD_RE = re.compile(r"^ep-shard\.u(\d+)\.([0-9a-f]+)\.(\d+)-of-(\d+)\.pt$")
CONSOLIDATE = "python -m fairseq_smoe.checkpoints consolidate"


# ----------------------------------------------------------------------------- the live model


@dataclass
class Plan:
    """What a trainer's model looks like to the checkpoint code (no process group calls)."""

    names: List[str]  # parameter names in optimizer order (model then criterion, requires_grad)
    params: List[torch.Tensor]
    expert: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)  # name -> (lo, hi, E)
    ep: Optional[object] = None  # the ExpertParallel of the experts (one per job)
    world_size: int = 1
    num_experts: Optional[int] = None  # experts per block (per stacked layer)
    expert_names: List[str] = field(default_factory=list)  # every expert parameter, split or not

    @property
    def is_ep(self) -> bool:
        return self.ep is not None and self.world_size > 1

    @property
    def index_of(self) -> Dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def meta(self, run_id: str) -> dict:
        return {
            "version": VERSION, "run_id": run_id, "world_size": self.world_size,
            "expert_parallel": self.is_ep, "num_experts": self.num_experts,
            "param_names": list(self.names), "expert_keys": list(self.expert_names),
        }


def plan_for(trainer) -> Optional[Plan]:
    """The Plan of a fairseq Trainer whose model has SMoE experts (None for other models). Cached."""
    from .modules.experts import StackedExperts

    model, criterion = trainer.get_model(), trainer.get_criterion()
    cached = trainer.__dict__.get("_smoe_plan")
    if cached is not None and cached[0] is model:
        return cached[1]
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, StackedExperts)]
    plan = None
    if experts:
        names, params = [], []
        for prefix, module in (("", model), ("criterion.", criterion)):
            for n, p in module.named_parameters():
                if p.requires_grad:
                    names.append(prefix + n)
                    params.append(p)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        plan = Plan(names, params, world_size=world, num_experts=experts[0][1].num_experts)
        for n, m in experts:
            for p in ("w1", "b1", "w2", "b2"):
                plan.expert_names.append(f"{n}.{p}")
                if m.ep is not None:
                    plan.expert[f"{n}.{p}"] = (*m.local_range, m.num_experts)
                    plan.ep = m.ep
    trainer._smoe_plan = (model, plan)
    return plan


def _sharded(trainer) -> bool:
    return bool(getattr(trainer.cfg.model, "moe_sharded_checkpoint", False))


def _expert_state_keys(osd, plan: Plan, local: bool, where: str) -> Dict[int, List[str]]:
    """{optimizer index: state keys to split} for the expert parameters: tensors of the
    parameter's own shape (``local``) or of its full [E, ...] shape. Scalars (Adam's step) are
    kept as they are; any other shape cannot be split per expert."""
    out = {}
    if not osd or "state" not in osd:
        return out
    index_of = plan.index_of
    for name, (lo, hi, E) in plan.expert.items():
        idx = index_of[name]
        st = osd["state"].get(idx)
        if not st:
            continue
        shape = tuple(plan.params[idx].shape)
        want = shape if local else (E,) + shape[1:]
        keys = []
        for key, v in st.items():
            if not torch.is_tensor(v) or v.dim() == 0 or v.numel() == 1:
                continue
            if tuple(v.shape) != want:
                raise CheckpointError(
                    where, f"has optimizer state {key!r} of expert parameter {name} with shape {tuple(v.shape)}, "
                    f"neither the parameter's {want} nor a scalar: this optimizer keeps state that cannot be "
                    f"split per expert", "train with --optimizer adam (or sgd), or pass --reset-optimizer")
            keys.append(key)
        out[idx] = sorted(keys)
    return out


# ----------------------------------------------------------------------------- saving (collective)


@dataclass
class PendingSave:
    """Prepared on every rank by the consolidate step of a save; used by rank 0's state_dict
    and save_checkpoint."""

    mode: str  # "consolidated" or "sharded"
    run_id: str
    save_id: str
    model: Dict[str, torch.Tensor] = field(default_factory=dict)  # full experts (rank 0)
    optim: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    entries: List[dict] = field(default_factory=list)  # shard files of ranks > 0 (rank 0)
    group_size: int = 1


def run_id_of(trainer) -> str:
    rid = trainer.__dict__.get("_smoe_run_id")
    if rid is None:
        rid = trainer._smoe_run_id = uuid.uuid4().hex[:16]
    return rid


def _gather_rows(t: torch.Tensor, ep) -> Optional[torch.Tensor]:
    """[lo:hi] slices of the first exchange group's ranks, concatenated on global rank 0."""
    G = ep.layout.group_size
    src = t.detach().contiguous()
    if G == 1:
        return src.cpu().clone()
    parts = [torch.empty_like(src) for _ in range(G)] if dist.get_rank() == 0 else None
    ep._run("gather of an expert tensor for the checkpoint", ep.layout.group_ranks,
            dist.gather, src, parts, dst=0, group=ep.group)
    return torch.cat([p.cpu() for p in parts]) if parts is not None else None


def prepare_save(trainer, plan: Plan) -> PendingSave:
    """Every rank, in the consolidate step of fairseq's save: agree on the run and save ids, then
    gather the experts and their optimizer state to rank 0 (consolidated) or write this rank's
    shard (sharded)."""
    ep = plan.ep
    ids = [run_id_of(trainer), uuid.uuid4().hex[:8]]
    dist.broadcast_object_list(ids, src=0)
    trainer._smoe_run_id = ids[0]
    mode = "sharded" if _sharded(trainer) else "consolidated"
    pending = PendingSave(mode, ids[0], ids[1], group_size=ep.layout.group_size)
    if ep.layout.group_ranks[0] != 0:
        return pending  # a replica of the first group's experts: nothing to add
    with_optim = not trainer.cfg.checkpoint.no_save_optimizer_state
    osd = trainer.optimizer.state_dict() if with_optim else None
    keys = _expert_state_keys(osd, plan, local=True, where="(the live optimizer)")
    agreed = [None] * ep.layout.group_size
    dist.all_gather_object(agreed, sorted(keys.items()), group=ep.group)
    if any(a != agreed[0] for a in agreed):
        raise RuntimeError(
            "expert parallelism: the ranks hold optimizer state for different expert parameters "
            f"({agreed}); cannot write a checkpoint that loads correctly")
    index_of = plan.index_of
    if mode == "consolidated":
        for name in sorted(plan.expert):
            full = _gather_rows(plan.params[index_of[name]], ep)
            if full is not None:
                pending.model[name] = full
        for idx, ks in sorted(keys.items()):
            for key in ks:
                full = _gather_rows(osd["state"][idx][key], ep)
                if full is not None:
                    pending.optim.setdefault(idx, {})[key] = full
        return pending
    # sharded: ranks 1.. of the first group write their shard now; rank 0 writes shard 0 and
    # the index in save_checkpoint (it needs the whole training state, known only there)
    rank = ep.layout.group_rank
    entry = None
    if rank > 0:
        num_updates = trainer.get_num_updates()
        lo, hi = ep.layout.local_experts
        shard = {
            "smoe_shard": _shard_meta(ids, rank, ep.layout.group_size, (lo, hi), plan.num_experts, num_updates),
            "model": {n: plan.params[index_of[n]].detach().cpu().clone() for n in sorted(plan.expert)},
            "optimizer_state": {idx: {k: osd["state"][idx][k].detach().cpu().clone() for k in ks}
                                for idx, ks in keys.items()},
        }
        path = os.path.join(trainer.cfg.checkpoint.save_dir, shard_name(num_updates, ids[1], rank, ep.layout.group_size))
        entry = write_shard(shard, path, rank, (lo, hi))
    entries = [None] * ep.layout.group_size
    dist.all_gather_object(entries, entry, group=ep.group)
    pending.entries = [e for e in entries if e is not None]
    return pending


def consolidated_state(state: dict, pending: PendingSave, plan: Plan) -> dict:
    """Rank 0's trainer state with the gathered full experts and optimizer state (the live
    optimizer's per-parameter dicts are copied, never changed)."""
    for name, full in pending.model.items():
        state["model"][name] = full
    osd = state.get("last_optimizer_state")
    if osd is not None and pending.optim:
        osd = state["last_optimizer_state"] = dict(osd)
        osd["state"] = dict(osd["state"])
        for idx, tensors in pending.optim.items():
            osd["state"][idx] = {**osd["state"][idx], **tensors}
    return state


def _shard_meta(ids, rank, of, experts, num_experts, num_updates):
    return {"format": SHARD_FORMAT, "version": VERSION, "run_id": ids[0], "save_id": ids[1], "rank": rank,
            "of": of, "experts": list(experts), "num_experts": num_experts, "num_updates": num_updates}


def shard_name(num_updates: int, save_id: str, rank: int, of: int) -> str:
    return f"ep-shard.u{num_updates}.{save_id}.{rank}-of-{of}.pt"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(obj: dict, path: str, rank: int, experts) -> dict:
    """torch.save atomically; the index entry of the file."""
    atomic_write(path, lambda f: torch.save(obj, f))
    return {"file": os.path.basename(path), "rank": rank, "experts": list(experts),
            "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def write_index(path: str, meta: dict, entries: List[dict], world_size: int) -> dict:
    E, G = meta["num_experts"], len(entries)
    index = {
        "format": INDEX_FORMAT, "version": VERSION, "run_id": meta["run_id"], "save_id": meta["save_id"],
        "num_updates": meta["num_updates"], "world_size": world_size, "num_experts": E, "shards": G,
        "experts_per_shard": E // G, "files": sorted(entries, key=lambda e: e["rank"]),
        "load": f"fairseq-train and fairseq-generate load this index at any world size; "
                f"{CONSOLIDATE} {os.path.basename(path)} OUT.pt writes one file",
    }
    atomic_write(path, lambda f: f.write((json.dumps(index, indent=1) + "\n").encode()))
    return index


def save_sharded(trainer, filename: str, extra_state: dict, pending: PendingSave) -> str:
    """Rank 0: shard 0 (its fairseq checkpoint with its own experts) and the index at filename."""
    from fairseq import utils

    plan = plan_for(trainer)
    ep = plan.ep
    logger.info(f"Saving sharded checkpoint to {os.path.abspath(filename)}")
    state = utils.move_to_cpu(trainer.state_dict())
    state["extra_state"].update(extra_state)
    num_updates = trainer.get_num_updates()
    ids = (pending.run_id, pending.save_id)
    lo, hi = ep.layout.local_experts
    state["smoe_shard"] = _shard_meta(ids, 0, pending.group_size, (lo, hi), plan.num_experts, num_updates)
    path = os.path.join(os.path.dirname(filename), shard_name(num_updates, pending.save_id, 0, pending.group_size))
    entries = [write_shard(state, path, 0, (lo, hi))] + pending.entries
    write_index(filename, state["smoe_shard"], entries, plan.world_size)
    logger.info(f"Finished saving sharded checkpoint to {os.path.abspath(filename)} ({len(entries)} shards)")
    return os.path.abspath(filename)


def sweep_shards(directory: str) -> List[str]:
    """Remove shard files of ``directory`` that no index there lists (older saves of
    checkpoint_last.pt, indices fairseq removed with --keep-interval-updates). Returns them."""
    referenced, shards = set(), []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if SHARD_RE.match(name):
            shards.append(name)
        elif name.endswith(".pt"):
            index = read_index(path)
            if index is not None:
                referenced.update(e["file"] for e in index["files"])
    removed = []
    for name in shards:
        if name not in referenced:
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError as err:
                logger.warning(f"could not remove the unreferenced shard {name}: {err}")
    return removed


# ----------------------------------------------------------------------------- loading


def read_index(path) -> Optional[dict]:
    """The shard index at path, or None when path is not one (a regular checkpoint, missing...)."""
    path = str(path)
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > (4 << 20):
            return None
        with open(path, "rb") as f:
            head = f.read(64)
            if not head.lstrip().startswith(b"{"):
                return None
            text = head + f.read()
    except OSError:
        return None
    try:
        index = json.loads(text)
    except ValueError:
        if INDEX_FORMAT.encode() in text:
            raise CheckpointError(path, "is a damaged shard index (not valid JSON)",
                                  "copy the shard set again, or use another checkpoint") from None
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return None
    if index.get("version") != VERSION:
        raise CheckpointError(path, f"is a shard index of version {index.get('version')}; this plugin reads "
                              f"version {VERSION}", "use the fairseq-smoe version that wrote it")
    return index


def _files_problem(path: str, index: dict) -> Optional[Tuple[str, str]]:
    """(problem, fix) of the files of a shard set: missing, extra, or of another size."""
    directory = os.path.dirname(os.path.abspath(path))
    listed = {e["file"]: e for e in index["files"]}
    missing = [f for f in listed if not os.path.isfile(os.path.join(directory, f))]
    ranks = sorted(e["rank"] for e in index["files"])
    G = index["shards"]
    fix = (f"copy the whole set (the index and every file it lists, into one directory), or give a consolidated "
           f"checkpoint ({CONSOLIDATE} writes one from a complete set)")
    if ranks != list(range(G)):
        return (f"is a shard index of {G} shards that lists shard ranks {ranks}: the index is damaged", fix)
    if missing:
        text = ", ".join(f"{f} (shard {listed[f]['rank']}, experts {listed[f]['experts'][0]}.."
                         f"{listed[f]['experts'][1] - 1})" for f in missing)
        return (f"is the index of a shard set of {G} files in {directory}, but {len(missing)} of them "
                f"{'is' if len(missing) == 1 else 'are'} missing: {text}", fix)
    pattern = os.path.join(directory, f"ep-shard.u*.{index['save_id']}.*")
    extra = sorted(os.path.basename(f) for f in glob.glob(pattern) if os.path.basename(f) not in listed)
    if extra:
        return (f"is the index of a shard set of {G} files, but {directory} also holds {', '.join(extra)} "
                f"with the same save id and not in the index: the set is not the one the index describes",
                "remove the extra files if you know where they came from, or copy the set again")
    for f, e in listed.items():
        size = os.path.getsize(os.path.join(directory, f))
        if size != e["bytes"]:
            return (f"lists {f} with {e['bytes']} bytes, but the file has {size}: it was truncated or replaced "
                    f"after the index was written", fix)
    return None


class ShardSet:
    """A verified shard set; shards are read (and hash-checked) on first use."""

    def __init__(self, path, index=None):
        self.path = str(path)
        self.index = index if index is not None else read_index(path)
        if self.index is None:
            raise CheckpointError(self.path, "is not a shard index")
        problem = _files_problem(self.path, self.index)
        if problem:
            raise CheckpointError(self.path, *problem)
        self.directory = os.path.dirname(os.path.abspath(self.path))
        self.E = self.index["num_experts"]
        self.k = self.index["experts_per_shard"]
        self._cache = {}

    def shard(self, rank: int) -> dict:
        if rank in self._cache:
            return self._cache[rank]
        entry = self.index["files"][rank]
        f = os.path.join(self.directory, entry["file"])
        try:  # memory-mapped: a rank copies only the slices it keeps
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(self.path, f"lists {entry['file']}, which cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})",
                                  "copy the shard set again, or use another checkpoint") from err
        meta = obj.get("smoe_shard") if isinstance(obj, dict) else None
        ix = self.index
        if not meta or meta.get("format") != SHARD_FORMAT:
            raise CheckpointError(self.path, f"lists {entry['file']}, which is not a fairseq-smoe shard",
                                  "copy the shard set again")
        if (meta["run_id"], meta["save_id"]) != (ix["run_id"], ix["save_id"]):
            what = "another run" if meta["run_id"] != ix["run_id"] else "another save of the same run"
            raise CheckpointError(
                self.path, f"is a shard set that mixes files of two saves: {entry['file']} was written by {what} "
                f"(run {meta['run_id']}, update {meta['num_updates']}, save {meta['save_id']}), the index by run "
                f"{ix['run_id']} at update {ix['num_updates']} (save {ix['save_id']})",
                "copy the set of one save together (the index and its files), or use another checkpoint")
        if (meta["rank"], meta["of"], list(meta["experts"])) != (entry["rank"], ix["shards"], list(entry["experts"])):
            raise CheckpointError(self.path, f"lists {entry['file']} as shard {entry['rank']} of {ix['shards']}, "
                                  f"but the file is shard {meta['rank']} of {meta['of']}", "copy the shard set again")
        digest = _sha256(f)
        if digest != entry["sha256"]:
            raise CheckpointError(self.path, f"lists {entry['file']} with SHA-256 {entry['sha256'][:12]}..., but the "
                                  f"file's is {digest[:12]}...: it changed after the index was written",
                                  "copy the shard set again, or use another checkpoint")
        self._cache[rank] = obj
        return obj

    def assemble(self, plan: Optional[Plan] = None, optimizer: bool = True) -> dict:
        """The fairseq checkpoint of this set: full experts, or this rank's slices for an
        expert-parallel ``plan``; without ``optimizer``, no optimizer state."""
        base = self.shard(0)
        if not optimizer:
            base = {k: v for k, v in base.items() if k != "last_optimizer_state"}
        meta = base.get("extra_state", {}).get(META) or {}
        expert_keys = meta.get("expert_keys") or []
        param_names = meta.get("param_names") or []
        osd = base.get("last_optimizer_state")
        state_keys = {}
        if osd and "state" in osd:
            for idx, name in enumerate(param_names):
                st = osd["state"].get(idx)
                if name in expert_keys and st:
                    state_keys[idx] = sorted(k for k, v in st.items()
                                             if torch.is_tensor(v) and v.dim() > 0 and v.numel() > 1)
        own = {n: base["model"][n] for n in expert_keys}
        own_state = {i: {k: osd["state"][i][k] for k in ks} for i, ks in state_keys.items()}

        def pieces(s):
            if s == 0:
                return own, own_state
            sh = self.shard(s)
            return sh["model"], sh["optimizer_state"]

        def cut(get, lo, hi):
            out = []
            for s in range(lo // self.k, (hi - 1) // self.k + 1):
                t = get(s)
                a, b = max(lo, s * self.k) - s * self.k, min(hi, (s + 1) * self.k) - s * self.k
                out.append(t if (a, b) == (0, self.k) else t[a:b])
            return out[0].clone() if len(out) == 1 else torch.cat(out)

        def wanted(name):
            if plan is not None and name in plan.expert:
                lo, hi, E = plan.expert[name]
                if E != self.E:
                    raise CheckpointError(
                        self.path, f"is a shard set of a model with {self.E} experts per block; this model has {E}",
                        "build the model with the checkpoint's flags (--moe-expert-count, --smoe-strata, ...)")
                return lo, hi
            return 0, self.E

        state = dict(base)
        state.pop("smoe_shard", None)
        state["model"] = dict(base["model"])
        for name in expert_keys:
            lo, hi = wanted(name)
            state["model"][name] = cut(lambda s: pieces(s)[0][name], lo, hi)
        if state_keys:
            osd = state["last_optimizer_state"] = dict(osd)
            osd["state"] = dict(osd["state"])
            for idx, ks in state_keys.items():
                lo, hi = wanted(param_names[idx])
                st = osd["state"][idx] = dict(osd["state"][idx])
                for key in ks:
                    st[key] = cut(lambda s: pieces(s)[1][idx][key], lo, hi)
        self._cache.clear()
        return state


def localize(state: dict, plan: Plan, path: str) -> dict:
    """A checkpoint with full [E, ...] experts (consolidated, or from any non-expert-parallel
    run) cut to this rank's experts, parameters and optimizer state, after checking every
    optimizer-state tensor against its parameter."""
    model = state.get("model") or {}
    for name, (lo, hi, E) in plan.expert.items():
        t = model.get(name)
        if t is None:
            continue  # the strict model load names it
        if t.dim() == 0 or t.size(0) != E:
            raise CheckpointError(
                path, f"holds {t.size(0) if t.dim() else 0} experts in {name}, this model's blocks have {E}: "
                f"it is not a consolidated checkpoint of this model (a checkpoint written with only rank 0's "
                f"experts, or another model)", "use a checkpoint of this model, or build the model with its flags")
        model[name] = t[lo:hi].clone()
    osd = state.get("last_optimizer_state")
    if osd is not None and "state" in osd:
        keys = _expert_state_keys(osd, plan, local=False, where=path)
        for idx, ks in keys.items():
            lo, hi, _ = plan.expert[plan.names[idx]]
            osd["state"][idx] = {**osd["state"][idx], **{k: osd["state"][idx][k][lo:hi].clone() for k in ks}}
        check_optimizer_state(osd, plan, path)
    return state


def upgrade_expert_layout(state: dict, path: str) -> None:
    """The optimizer state of a checkpoint saved before the expert weights took nn.Linear's
    ``[out, in]`` layout (``modules/experts.py``: its model has expert weights and no
    ``weight_layout`` key), transposed as the model's load transposes the weights themselves:
    the state tensors of each expert weight (Adam's moments), or their segments of fairseq's
    flat fp32 buffer (``--fp16`` / ``--bf16`` with flattened gradients). In place."""
    model = state.get("model") or {}
    old = []
    for k in model:
        module, _, name = k.rpartition(".")
        if module.split(".")[-1] == "experts" and is_expert_weight(name) and f"{module}.{LAYOUT_KEY}" not in model:
            old.append(k)
    osd = state.get("last_optimizer_state")
    if not old or not osd or not osd.get("state"):
        return
    names = ((state.get("extra_state") or {}).get(META) or {}).get("param_names")
    old_set, shapes = set(old), {tuple(model[k].shape) for k in old}
    total = sum(model[n].numel() for n in names) if names and all(n in model for n in names) else None
    largest_1d = max([t.numel() for t in model.values() if torch.is_tensor(t) and t.dim() == 1] or [0])
    for idx, st in osd["state"].items():
        for key, v in list(st.items()):
            if not torch.is_tensor(v):
                continue
            if v.dim() == 1 and v.numel() == total:  # fairseq's flat fp32 buffer, in optimizer order
                v, at = v.clone(), 0
                for n in names:
                    if n in old_set:
                        seg = v[at:at + model[n].numel()]
                        seg.copy_(seg.view(model[n].shape).transpose(1, 2).reshape(-1))
                    at += model[n].numel()
                st[key] = v
            elif v.dim() == 1 and v.numel() > largest_1d:
                raise CheckpointError(
                    path, f"has flat optimizer state ({key!r}, {v.numel()} values) whose parameters it does not name: "
                    f"its expert weights' segments cannot be brought to the current [out, in] expert layout",
                    "resume with --reset-optimizer (the weights themselves load)")
            elif v.dim() == 3 and (names[idx] in old_set if names and isinstance(idx, int) and idx < len(names)
                                   else tuple(v.shape) in shapes):
                st[key] = v.transpose(1, 2).contiguous()


def check_optimizer_state(osd: dict, plan: Plan, path: str) -> None:
    """Every optimizer-state tensor has its parameter's shape (torch's loader casts without
    checking, so a mismatch would train on wrong state)."""
    for idx, st in osd.get("state", {}).items():
        if not isinstance(idx, int) or not 0 <= idx < len(plan.params):
            raise CheckpointError(path, f"has optimizer state for parameter #{idx}, but this model has "
                                  f"{len(plan.params)} parameters", "pass --reset-optimizer, or use a checkpoint of this model")
        shape = tuple(plan.params[idx].shape)
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.numel() > 1 and tuple(v.shape) != shape:
                raise CheckpointError(
                    path, f"has optimizer state {key!r} of shape {tuple(v.shape)} for parameter #{idx} "
                    f"({plan.names[idx]}, shape {shape}): the optimizer state does not belong to this model",
                    "pass --reset-optimizer, or use a checkpoint of this model")


def rescale_iterator(extra_state: dict, world_size: int) -> None:
    """fairseq counts consumed batches per rank; a resume at another world size continues at the
    same global batch (the batch order is the same at every world size)."""
    meta = (extra_state or {}).get(META)
    itr = (extra_state or {}).get("train_iterator")
    if not meta or not itr or meta.get("world_size", world_size) == world_size:
        return
    saved, n = meta["world_size"], itr.get("iterations_in_epoch", 0)
    total = n * saved
    itr["iterations_in_epoch"] = total // world_size
    again = total - itr["iterations_in_epoch"] * world_size
    logger.info(f"resuming a run saved at world size {saved} on {world_size}: epoch {itr.get('epoch')} continues "
                f"after its first {total} batches ({itr['iterations_in_epoch']} per rank now)")
    if again:
        logger.warning(f"{total} batches do not split over {world_size} ranks: {again} of them will be seen again")


def load_mapped(path: str, arg_overrides=None) -> dict:
    """fairseq's load_checkpoint_to_cpu with the file memory-mapped (copy-on-write): every
    expert-parallel rank reads the checkpoint, and keeps only its slices of the experts, so the
    ranks of a node share one copy in the page cache instead of each holding the whole file."""
    return finish_like_fairseq(torch.load(path, map_location="cpu", weights_only=True, mmap=True), arg_overrides)


def finish_like_fairseq(state: dict, arg_overrides=None) -> dict:
    """What fairseq's load_checkpoint_to_cpu does after torch.load (cfg to OmegaConf, overrides,
    upgrades), for a state assembled from shards."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    if state.get("args") is not None and arg_overrides is not None:
        for k, v in arg_overrides.items():
            setattr(state["args"], k, v)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    return checkpoint_utils._upgrade_state_dict(state)


# ----------------------------------------------------------------------------- command line


def _load_any(path: str) -> Tuple[dict, Optional[dict]]:
    """(fairseq checkpoint with full experts, index or None) of a consolidated file or a set."""
    from .checkpoint_io import read_checkpoint

    index = read_index(path)
    if index is not None:
        return ShardSet(path, index).assemble(), index
    return read_checkpoint(path), None


def _meta_of(state: dict, path: str) -> dict:
    meta = (state.get("extra_state") or {}).get(META)
    if not meta or not meta.get("param_names"):
        raise CheckpointError(
            path, "has no smoe_parallel record (parameter names in optimizer order): it was saved by an older "
            "fairseq-smoe or by another model, so its optimizer state cannot be split per expert",
            "resume from it directly (a consolidated checkpoint loads at any world size)")
    return meta


def check_paths(src: str, out: str) -> None:
    """The output of a conversion is a new file: not the source, not an existing directory,
    not inside a file. Checked before anything is read or written."""
    if os.path.isdir(out):
        raise errors.ConfigError(f"output {out} is a directory; give the path of the file to write, "
                                 f"e.g. {os.path.join(out, os.path.basename(src))}")
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise errors.ConfigError(f"output {out} is the source checkpoint {src}; write the converted "
                                 f"checkpoint to another path (the source is kept as it is)")
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise errors.ConfigError(f"output {out}: {parent} is a file, not a directory")


def check_world_size(world_size) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise errors.ConfigError(f"--world-size {world_size}: the number of training processes (GPUs) "
                                 f"the shard set is for must be at least 1")


def consolidate(src: str, out: str) -> dict:
    """A shard set (its index) -> one consolidated checkpoint file."""
    check_paths(src, out)
    state, index = _load_any(src)
    if index is None:
        raise CheckpointError(src, "is already a consolidated checkpoint (not a shard index)",
                              "give the index of a shard set (the NAME.pt written with --moe-sharded-checkpoint)")
    atomic_write(out, lambda f: torch.save(state, f))
    return state


def reshard(src: str, out: str, world_size: int) -> dict:
    """A consolidated checkpoint or a shard set -> a shard set for ``world_size`` ranks (index at
    ``out``, shards next to it)."""
    from .modules.expert_parallel import ep_layout

    check_world_size(world_size)
    check_paths(src, out)
    state, _ = _load_any(src)
    meta = _meta_of(state, src)
    E = meta["num_experts"]
    try:
        ep_layout(E, world_size, 0)
    except ValueError as err:
        raise CheckpointError(src, f"cannot be split for --world-size {world_size}: {err}") from None
    G = min(E, world_size)
    k = E // G
    expert_keys, names = meta["expert_keys"], meta["param_names"]
    osd = state.get("last_optimizer_state")
    ids = (meta["run_id"], uuid.uuid4().hex[:8])
    num_updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    state_keys = {}
    if osd and "state" in osd:
        for idx, name in enumerate(names):
            st = osd["state"].get(idx)
            if name in expert_keys and st:
                state_keys[idx] = sorted(key for key, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() > 1)
                for key in state_keys[idx]:
                    if st[key].size(0) != E:
                        raise CheckpointError(src, f"has optimizer state {key!r} of {name} with shape "
                                              f"{tuple(st[key].shape)}, not [{E}, ...]")
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    entries = []
    try:
        for r in range(G):
            lo, hi = r * k, (r + 1) * k
            path = os.path.join(directory, shard_name(num_updates, ids[1], r, G))
            meta_r = _shard_meta(ids, r, G, (lo, hi), E, num_updates)
            if r == 0:
                shard = dict(state)
                shard["model"] = {n: (t[lo:hi].clone() if n in expert_keys else t) for n, t in state["model"].items()}
                if state_keys:
                    o = shard["last_optimizer_state"] = dict(osd)
                    o["state"] = {i: ({**st, **{key: st[key][lo:hi].clone() for key in state_keys[i]}} if i in state_keys else st)
                                  for i, st in osd["state"].items()}
                # extra_state[META]["world_size"] stays the saving run's: the epoch iterator's position
                # counts that run's batches per rank (rescale_iterator)
                shard["smoe_shard"] = meta_r
            else:
                shard = {"smoe_shard": meta_r,
                         "model": {n: state["model"][n][lo:hi].clone() for n in expert_keys},
                         "optimizer_state": {i: {key: osd["state"][i][key][lo:hi].clone() for key in ks}
                                             for i, ks in state_keys.items()}}
            entries.append(write_shard(shard, path, r, (lo, hi)))
        write_index(out, {"run_id": ids[0], "save_id": ids[1], "num_updates": num_updates, "num_experts": E},
                    entries, world_size)
    except BaseException:  # a set that could not be completed (a full disk...): none of its files stay
        for e in entries:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, e["file"]))
        raise
    return state


def describe(path: str) -> str:
    index = read_index(path)
    if index is None:
        state, _ = _load_any(path)
        meta = (state.get("extra_state") or {}).get(META) or {}
        experts = {n: tuple(state["model"][n].shape) for n in meta.get("expert_keys", []) if n in state["model"]}
        return (f"{path}: consolidated checkpoint, update {(state.get('optimizer_history') or [{}])[-1].get('num_updates')}, "
                f"saved at world size {meta.get('world_size', '?')} (expert parallel: {meta.get('expert_parallel', '?')}), "
                f"{meta.get('num_experts', '?')} experts per block, {len(experts)} expert tensors, e.g. "
                f"{next(iter(experts.items()), None)}; run {meta.get('run_id', '?')}")
    ShardSet(path, index).assemble()  # every file read and checked
    lines = [f"{path}: shard index, run {index['run_id']} save {index['save_id']}, update {index['num_updates']}, "
             f"saved at world size {index['world_size']}, {index['num_experts']} experts per block in "
             f"{index['shards']} shards of {index['experts_per_shard']} (all files present and matching)"]
    for e in index["files"]:
        lines.append(f"  shard {e['rank']}: {e['file']}  experts {e['experts'][0]}..{e['experts'][1] - 1}  "
                     f"{e['bytes']} bytes  sha256 {e['sha256'][:16]}")
    return "\n".join(lines)


@errors.cli(returns=True)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_smoe.checkpoints",
        description="Convert fairseq-smoe checkpoints between one consolidated file and a shard set "
        "(index + one file per expert-holding rank), and between world sizes. Both forms load at any "
        "world size; these commands change only how the file(s) are laid out.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="shard set (its index NAME.pt) -> one checkpoint file")
    c.add_argument("index")
    c.add_argument("out")
    r = sub.add_parser("reshard", help="checkpoint file or shard set -> shard set for --world-size W")
    r.add_argument("src")
    r.add_argument("out", help="the new index; its shard files are written next to it")
    r.add_argument("--world-size", type=int, required=True)
    k = sub.add_parser("check", help="read and verify a checkpoint or shard set; print its layout")
    k.add_argument("path")
    args = parser.parse_args(argv)
    import fairseq_smoe  # noqa: F401  (safe-loading allowlist)

    if args.cmd == "consolidate":
        consolidate(args.index, args.out)
        print(f"wrote {args.out}")
    elif args.cmd == "reshard":
        reshard(args.src, args.out, args.world_size)
        print(describe(args.out))
    else:
        print(describe(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
