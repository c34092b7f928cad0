"""Reading and writing fairseq checkpoints so that nothing breaks obscurely (installed at import).

Importing the plugin (``--user-dir fairseq_smoe``, ``import fairseq_smoe``) wraps fairseq 0.12.3's
checkpoint functions; every entry point goes through them:

* ``fairseq-train`` resume (``checkpoint_last.pt`` in ``--save-dir``, ``--restore-file``):
  ``checkpoint_utils.load_checkpoint`` -> ``Trainer.load_checkpoint`` -> ``load_checkpoint_to_cpu``;
* ``fairseq-generate``, ``fairseq-interactive``, ``python -m fairseq_smoe.evaluate`` and
  ``python -m fairseq_smoe.cost --checkpoint``: ``load_model_ensemble[_and_task]`` ->
  ``load_checkpoint_to_cpu`` (the evaluator also reads the task flags with ``read_checkpoint``).

Reading: a file that cannot be used (missing, empty, truncated or corrupt, random bytes, a Git LFS
pointer, a tensor or bare state dict instead of a fairseq checkpoint, an architecture nobody
registered, weights of another model) raises one ``CheckpointError`` naming the file, what is
wrong and what to do. Uncaught, it prints as a single ``error: ...`` line (``sys.excepthook``).

Writing: every checkpoint file training writes is atomic. fairseq writes the first file of a save
to ``NAME.tmp`` and renames it (without fsync), but makes the others (``checkpoint_last.pt``,
``checkpoint_best.pt``) with a plain, non-atomic copy, so a kill in the middle leaves a truncated
``checkpoint_last.pt`` and the next resume fails. Here both go to ``NAME.tmp`` in the same
directory, are fsynced and ``os.replace``d over ``NAME`` (then the directory is fsynced): a kill at
any moment leaves either the previous file or the new one, never a partial one (at most a stale
``NAME.tmp``, overwritten by the next save). A full disk or quota (ENOSPC, EDQUOT) removes
``NAME.tmp`` and raises ``DiskFullError``: one line naming ``NAME``, the bytes it needs and those
free, the previous ``NAME`` untouched.

Expert parallelism (``--moe-expert-parallel``; the formats and the logic are in
``checkpoints.py``): the trainer's save gathers every rank's experts and their optimizer state
into one consolidated file, or writes a shard set (``--moe-sharded-checkpoint``); its load gives
each rank its slice of either, at any world size; the gradient norm (``--clip-norm``, the logged
``gnorm``) includes the experts, which fairseq's own norm leaves out.
"""

import argparse
import contextlib
import contextvars
import errno
import os
import re
import shutil
import sys
import traceback
import zipfile

import torch
from fairseq import checkpoint_utils, trainer as fairseq_trainer, utils as fairseq_utils
from fairseq.file_io import PathManager

from .errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be used: the message names the file, the problem and the fix."""

    def __init__(self, path, problem, fix=None):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"checkpoint {path} {problem}" + (f". {fix[0].upper()}{fix[1:]}" if fix else ""))


# ----------------------------------------------------------------------------- diagnosis

WRITTEN_BY_TRAIN = ("use a checkpoint written by fairseq-train (checkpoint_best.pt, checkpoint_last.pt "
                    "or checkpoint_E_U.pt in its --save-dir)")
DAMAGED = "copy it again from where it came from, or " + WRITTEN_BY_TRAIN.replace("use a", "use another")
# pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2): how a pre-zip (torch < 1.6) file starts
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_resuming = contextvars.ContextVar("fairseq_smoe_resuming", default=None)
_resuming_task = contextvars.ContextVar("fairseq_smoe_resuming_task", default=None)  # the task of a resume
_ep_target = contextvars.ContextVar("fairseq_smoe_ep_target", default=None)  # (Plan, reset_optimizer) of an EP rank
_ep_norm = contextvars.ContextVar("fairseq_smoe_ep_norm", default=None)  # exchange group while clipping
_building = contextvars.ContextVar("fairseq_smoe_building", default=None)
_last_read = [None]


def _first_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _resume_fix(fix):
    """In fairseq-train's resume, the fix says how to go on with the run."""
    path = _resuming.get()
    if path is None:
        return fix
    resume = (f"to resume, pass --restore-file with an intact checkpoint of this run (another checkpoint*.pt "
              f"of --save-dir), or remove {path} to train from scratch")
    return f"{fix}; or, {resume}" if "git lfs" in fix else resume


def structure_problem(state):
    """What keeps a loaded object from being a fairseq checkpoint (None if nothing)."""
    if not isinstance(state, dict):
        kind = type(state).__module__.replace("builtins", "").strip(".")
        kind = f"{kind}.{type(state).__name__}".lstrip(".")
        return f"holds a {kind}, not a fairseq checkpoint (a dict with 'model', 'cfg' and the training state)"
    if "model" not in state:
        tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        if state and len(tensors) == len(state):
            return (f"is a bare model state dict ({len(tensors)} tensors, e.g. {tensors[0]!r}), not a "
                    f"fairseq checkpoint: it has no 'cfg' to rebuild the model from and no training state")
        keys = ", ".join(repr(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "")
        return f"is a dict with keys {keys or '(none)'} but no 'model': not a fairseq checkpoint"
    if state.get("cfg") is None and state.get("args") is None:
        return "has 'model' but neither 'cfg' nor 'args': fairseq cannot rebuild the model from it"
    if "optimizer_history" not in state and "best_loss" not in state:
        return ("has 'model' and its configuration but no 'optimizer_history', the training state fairseq 0.12.3 "
                "needs even to decode: it was not written by fairseq-train")
    return None


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _content_problem(path):
    """(problem, fix) from loading an intact file ourselves, or None if it is a fairseq checkpoint."""
    try:
        state = _torch_load(path)
    except (EOFError, RuntimeError) as err:
        if isinstance(err, EOFError) or "truncated" in str(err) or "EOF" in str(err):
            return (f"is truncated: its pickle data ends early ({_first_line(err)})", DAMAGED)
        return f"cannot be read by torch.load ({_first_line(err)})", DAMAGED
    except Exception as err:  # noqa: BLE001  (UnpicklingError and whatever a damaged pickle raises)
        text = str(err)
        if "Unsupported global" in text:
            found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
            what = found.group(1) if found else _first_line(err)
            return (f"holds a Python object that safe loading (weights_only) refuses ({what}); fairseq-train "
                    f"checkpoints hold only tensors, containers and argparse.Namespace",
                    WRITTEN_BY_TRAIN + "; only for a file you trust: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "
                    "loads it without the safe loader")
        return f"is damaged: its pickle data cannot be read ({_first_line(err)})", DAMAGED
    problem = structure_problem(state)
    return (problem, WRITTEN_BY_TRAIN) if problem else None


def diagnose(path):
    """(problem, fix) for a checkpoint file that cannot be used, or None when the file itself is fine."""
    path = str(path)
    if not os.path.lexists(path):
        return "does not exist", "check the path (a relative path is taken from the current directory)"
    if os.path.isdir(path):
        return "is a directory, not a checkpoint file", f"give the .pt file inside, e.g. {os.path.join(path, 'checkpoint_best.pt')}"
    if not os.path.exists(path):
        return "is a broken symbolic link", "point it at an existing checkpoint"
    size = os.path.getsize(path)
    if size == 0:
        return ("is empty (0 bytes): the save that wrote it was interrupted or the disk was full",
                DAMAGED)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"cannot be opened ({_first_line(err)})", "check its permissions"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if not any(n.endswith("data.pkl") for n in names):
                    return "is a zip archive but not a PyTorch file (no data.pkl inside)", WRITTEN_BY_TRAIN
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return (f"is truncated or corrupt: a PyTorch zip archive of {size} bytes whose end (the zip central "
                    f"directory) is missing or damaged ({err}), as left by a save that was killed or ran out "
                    f"of disk space", DAMAGED)
        if bad is not None:
            return f"is corrupt: its member {bad} fails the zip CRC check", DAMAGED
        return _content_problem(path)
    if head.startswith(LEGACY_MAGIC):
        return _content_problem(path)
    if head[:1] == b"\x80":
        return ("is a plain Python pickle, not a file written by torch.save", WRITTEN_BY_TRAIN)
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the checkpoint itself", "fetch the file with `git lfs pull`"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut at the end of the 512 bytes is still text
        text = head[: err.start].decode("utf-8") if err.start >= len(head) - 3 else ""
    if text.strip() and all(c.isprintable() or c in "\n\r\t" for c in text):
        snippet = text.strip().splitlines()[0][:40]
        return f"is a text file (it starts with {snippet!r}), not a checkpoint", WRITTEN_BY_TRAIN
    return (f"is not a PyTorch checkpoint: it starts with the bytes {head[:8].hex(' ')}, neither a zip "
            f"archive ('PK') nor a pickle; it is damaged or not a checkpoint at all", DAMAGED)


def _error_from(path, err):
    """The CheckpointError for a failed read of path, or None when the file is not to blame."""
    found = diagnose(path)
    if found is None:
        return None
    problem, fix = found
    return CheckpointError(path, problem, _resume_fix(fix))


def read_checkpoint(path):
    """torch.load a fairseq checkpoint (weights_only stays on); CheckpointError if it is not one.
    A shard index (--moe-sharded-checkpoint) is read as the checkpoint its files make up."""
    from . import checkpoints

    path = str(path)
    index = checkpoints.read_index(path)
    if index is not None:
        return checkpoints.ShardSet(path, index).assemble()
    try:
        state = _torch_load(path)
    except Exception as err:  # noqa: BLE001
        found = _error_from(path, err) or CheckpointError(path, f"cannot be read ({_first_line(err)})", DAMAGED)
        raise found from err
    problem = structure_problem(state)
    if problem:
        raise CheckpointError(path, problem, WRITTEN_BY_TRAIN)
    return state


def _field(node, key):
    if node is None:
        return None
    if isinstance(node, argparse.Namespace) or not hasattr(node, "get"):
        return getattr(node, key, None)
    return node.get(key)


def _model_and_task_names(state):
    """(architecture, task) a checkpoint was trained with."""
    args = state.get("args")
    if args is not None:
        return getattr(args, "arch", None), getattr(args, "task", None)
    cfg = state["cfg"]
    model, task = _field(cfg, "model"), _field(cfg, "task")
    return (_field(model, "arch") or _field(model, "_name"), _field(task, "_name") or _field(task, "task"))


def _registration_problem(path, state, need_task):
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    try:
        model, task = _model_and_task_names(state)
    except Exception:  # noqa: BLE001  (odd cfg shapes: leave them to fairseq)
        return None
    known = "this plugin registers " + ", ".join(sorted(a for a, m in ARCH_MODEL_REGISTRY.items()
                                                        if m.__module__.startswith(__package__)))
    if model and model not in ARCH_MODEL_REGISTRY and model not in MODEL_REGISTRY:
        return CheckpointError(
            path, f"was trained with model architecture {model!r}, which neither fairseq nor any loaded "
            f"--user-dir registers", f"load the plugin that defines it with --user-dir ({known})")
    if need_task and task and task not in TASK_REGISTRY:
        return CheckpointError(
            path, f"was trained with task {task!r}, which neither fairseq nor any loaded --user-dir "
            f"registers", "load the plugin that defines it with --user-dir (this plugin registers smoe_translation)")
    return None


def _from_load_state_dict(err):
    return any(f.name == "load_state_dict" for f in traceback.extract_tb(err.__traceback__))


def _is_local(path):
    return not PathManager.path_requires_pathmanager(str(path))


# ----------------------------------------------------------------------------- wrappers (reading)


def _wrap(original, wrapper):
    wrapper.__wrapped__ = original
    wrapper.__name__ = original.__name__
    wrapper.__doc__ = original.__doc__
    wrapper._fairseq_smoe = True
    return wrapper


def _load_checkpoint_to_cpu(original):
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        from . import checkpoints

        local = _is_local(path)
        target, reset_optimizer = _ep_target.get() or (None, False)
        index = checkpoints.read_index(path) if local else None
        try:
            if index is not None:  # a shard set: this rank's part of it (everything without a target)
                state = checkpoints.ShardSet(path, index).assemble(target, optimizer=not reset_optimizer)
                state = checkpoints.finish_like_fairseq(state, arg_overrides)
            elif target is not None and local and zipfile.is_zipfile(path):
                state = checkpoints.load_mapped(str(path), arg_overrides)
            else:
                state = original(path, arg_overrides, load_on_all_ranks)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            found = _error_from(path, err) if local else None
            if found is None:
                raise
            raise found from err
        problem = structure_problem(state)
        if problem:
            raise CheckpointError(path, problem, _resume_fix(WRITTEN_BY_TRAIN))
        checkpoints.upgrade_expert_layout(state, str(path))  # (the model's load transposes the weights)
        if target is not None:  # an expert-parallel rank: its experts and their optimizer state
            if reset_optimizer:  # --reset-optimizer: fairseq ignores it; do not split or check it
                state.pop("last_optimizer_state", None)
            if index is None:
                checkpoints.localize(state, target, str(path))
            elif state.get("last_optimizer_state") is not None:
                checkpoints.check_optimizer_state(state["last_optimizer_state"], target, str(path))
        building = _building.get()
        if building is not None:
            found = _registration_problem(path, state, building["need_task"])
            if found:
                raise found
        _last_read[0] = str(path)
        task = _resuming_task.get()
        if task is not None:  # fairseq's other loaders call it (the data fingerprint); its resume does not
            task.load_state_dict(state.get("task_state") or {})
        return state

    return _wrap(original, load_checkpoint_to_cpu)


def _load_model_ensemble_and_task(original):
    def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, strict=True, suffix="",
                                     num_shards=1, state=None):
        if state is None and num_shards == 1 and not suffix:
            for name in filenames:
                if _is_local(name) and not os.path.isfile(name):
                    raise CheckpointError(name, *diagnose(name))
        token = _building.set({"need_task": task is None})
        _last_read[0] = None
        try:
            return original(filenames, arg_overrides, task, strict, suffix, num_shards, state)
        except CheckpointError:
            raise
        except RuntimeError as err:
            if not _from_load_state_dict(err):
                raise
            path = _last_read[0] or ",".join(map(str, filenames))
            raise CheckpointError(
                path, f"does not fit the model built from its configuration (and any --model-overrides): {err}"
            ) from err
        finally:
            _building.reset(token)

    return _wrap(original, load_model_ensemble_and_task)


def _trainer_load_checkpoint(original):
    def load_checkpoint(self, filename, *args, **kwargs):
        from omegaconf import open_dict

        from . import checkpoints

        plan = checkpoints.plan_for(self)
        target = plan if plan is not None and plan.is_ep else None
        reset_optimizer = kwargs.get("reset_optimizer", args[0] if args else False)
        token = _resuming.set(str(filename))
        task_token = _resuming_task.set(self.task)
        ep_token = _ep_target.set(None if target is None else (target, bool(reset_optimizer)))
        ckpt_cfg = self.cfg.checkpoint
        all_ranks = ckpt_cfg.load_checkpoint_on_all_dp_ranks
        if target is not None and not all_ranks:
            # every rank reads its own experts: fairseq's broadcast of rank 0's state cannot slice
            with open_dict(ckpt_cfg):
                ckpt_cfg.load_checkpoint_on_all_dp_ranks = True
        try:
            extra_state = original(self, filename, *args, **kwargs)
            if plan is not None and extra_state is not None:
                meta = extra_state.get(checkpoints.META) or {}
                if meta.get("run_id"):
                    self._smoe_run_id = meta["run_id"]
                checkpoints.rescale_iterator(extra_state, plan.world_size)
            return extra_state
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            inner = err.__context__
            # fairseq replaces the model's own load_state_dict error with a generic one
            if inner is None or not _from_load_state_dict(inner):
                raise
            raise CheckpointError(
                filename, f"does not fit the model this fairseq-train command builds: {inner}") from inner
        finally:
            _resuming.reset(token)
            _resuming_task.reset(task_token)
            _ep_target.reset(ep_token)
            if ckpt_cfg.load_checkpoint_on_all_dp_ranks != all_ranks:
                with open_dict(ckpt_cfg):
                    ckpt_cfg.load_checkpoint_on_all_dp_ranks = all_ranks

    return _wrap(original, load_checkpoint)


def _load_checkpoint(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        restore = cfg.restore_file
        if restore != "checkpoint_last.pt" and not cfg.finetune_from_model:
            suffix = trainer.checkpoint_suffix
            path = restore.replace(".pt", suffix + ".pt") if suffix is not None else restore
            if _is_local(path) and not os.path.exists(path):
                raise CheckpointError(
                    path, "(--restore-file) does not exist; fairseq would silently train from scratch",
                    "give an existing checkpoint (a relative path is taken from the current directory, not "
                    "from --save-dir), or leave --restore-file out to resume from --save-dir's checkpoint_last.pt")
        return original(cfg, trainer, **passthrough_args)

    return _wrap(original, load_checkpoint)


# ----------------------------------------------------------------------------- expert parallelism


def _trainer_consolidate_optimizer(original):
    """Every rank passes here at each save (fairseq's checkpoint_utils.save_checkpoint): the
    collective part of an expert-parallel save."""

    def consolidate_optimizer(self):
        from . import checkpoints

        original(self)
        self._smoe_pending = None
        plan = checkpoints.plan_for(self)
        if plan is not None and plan.is_ep:
            self._smoe_pending = checkpoints.prepare_save(self, plan)

    return _wrap(original, consolidate_optimizer)


def _trainer_state_dict(original):
    def state_dict(self):
        from . import checkpoints

        state = original(self)
        plan = checkpoints.plan_for(self)
        if plan is None:
            return state
        pending = self.__dict__.get("_smoe_pending")
        if plan.is_ep and pending is None:
            raise RuntimeError(
                "Trainer.state_dict() of an expert-parallel run holds only this rank's experts; save with "
                "fairseq's checkpoint_utils.save_checkpoint, which every rank calls (it gathers the experts)")
        state["extra_state"][checkpoints.META] = plan.meta(checkpoints.run_id_of(self))
        if pending is not None and pending.mode == "consolidated":
            checkpoints.consolidated_state(state, pending, plan)
        return state

    return _wrap(original, state_dict)


def _trainer_save_checkpoint(original):
    def save_checkpoint(self, filename, extra_state):
        from . import checkpoints

        pending = self.__dict__.get("_smoe_pending")
        if pending is None or pending.mode != "sharded" or not self.should_save_checkpoint_on_current_rank:
            return original(self, filename, extra_state)
        return checkpoints.save_sharded(self, filename, extra_state, pending)

    return _wrap(original, save_checkpoint)


def _save_checkpoint(original):
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        from . import checkpoints
        from .modules.expert_parallel import save_wait

        try:
            saved = original(cfg, trainer, epoch_itr, val_loss)
        finally:
            pending = trainer.__dict__.get("_smoe_pending")
            trainer._smoe_pending = None
            if pending is not None and pending.mode == "sharded" and trainer.data_parallel_rank == 0 \
                    and os.path.isdir(cfg.save_dir):
                checkpoints.sweep_shards(cfg.save_dir)
        save_wait()  # several ranks: the others wait for rank 0's write here, with --moe-save-timeout
        return saved

    return _wrap(original, save_checkpoint)


def _trainer_clip_grad_norm(original):
    def clip_grad_norm(self, clip_norm):
        from . import checkpoints

        plan = checkpoints.plan_for(self)
        token = _ep_norm.set(plan.ep if plan is not None and plan.is_ep else None)
        try:
            return original(self, clip_norm)
        finally:
            _ep_norm.reset(token)

    return _wrap(original, clip_grad_norm)


def _clip_grad_norm_(original):
    """fairseq's norm leaves out parameters tagged ``expert``; with expert parallelism the
    experts' squared norm, summed over one exchange group (every expert once), is added, so the
    norm (and clipping) is the one-process model's and the same on every rank."""

    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
        ep = _ep_norm.get()
        if ep is None:
            return original(params, max_norm, aggregate_norm_fn)
        import torch.distributed as dist

        params = [params] if isinstance(params, torch.Tensor) else list(params)
        grads = [p.grad.detach() for p in params if getattr(p, "grad", None) is not None and hasattr(p, "expert")]
        device = grads[0].device if grads else next((p.device for p in params), torch.device("cpu"))
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            sq += g.float().pow(2).sum()
        ep._run("all_reduce of the experts' gradient norm", ep.layout.group_ranks,
                dist.all_reduce, sq, group=ep.group)

        def with_experts(total):
            total = aggregate_norm_fn(total) if aggregate_norm_fn is not None else total
            return (total.float() ** 2 + sq.to(total.device)).sqrt()

        return original(params, max_norm, with_experts)

    return _wrap(original, clip_grad_norm_)


# ----------------------------------------------------------------------------- atomic writing


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskFullError(CheckpointError):
    """A checkpoint file could not be written for want of space (ENOSPC) or quota (EDQUOT); the
    previous file of that name is untouched and no temporary file is left."""

    def __init__(self, path, reason, needed, written, free):
        self.needed, self.written, self.free = needed, written, free
        directory = os.path.dirname(os.path.abspath(path))
        need = f"needs {_bytes(needed)}" if needed is not None else f"needs more than the {_bytes(written)} written"
        room = f", {_bytes(free)} free there" if free is not None and reason == "no space left on device" else ""
        kept = (f"{os.path.basename(path)} is still the previous file" if os.path.exists(path)
                else "nothing was written")
        more = (f"at least {_bytes(needed - free)} more " if needed is not None and free is not None
                and needed > free and reason == "no space left on device" else "")
        super().__init__(path, f"could not be written: {reason} ({need}{room}; {kept}, no "
                         f"{os.path.basename(path)}.tmp is left)",
                         f"make {more}room in {directory} (or write to a disk with more space) and run the command "
                         f"again")


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _no_room(err):
    """The ENOSPC/EDQUOT OSError in err's chain of causes, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _Recording:
    """The file given to atomic_write's ``write``: remembers the OSError of a failed write, which
    torch.save reports only as its own RuntimeError ('unexpected pos ...')."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


class _Counting:
    """A sink that counts what ``write`` would write: the size of a file that did not fit."""

    def __init__(self):
        self.bytes = 0

    def write(self, data):
        n = memoryview(data).nbytes
        self.bytes += n
        return n

    def flush(self):
        pass


def atomic_write(dst, write, size=None):
    """write(f) into dst.tmp, fsync, os.replace over dst: dst is always the old or the new file.
    A full disk or quota raises :class:`DiskFullError` naming dst and the bytes it needs (``size``
    when given, else counted by calling ``write`` once more into a sink)."""
    dst = str(dst)
    tmp = dst + ".tmp"
    recording = None
    try:
        with open(tmp, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as err:
        written = 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = _no_room(err) or (recording.error if recording is not None and isinstance(err, Exception)
                                 and _no_room(recording.error) else None)
        if full is None:
            raise
        raise _disk_full(dst, write, size, written, full) from err
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def _disk_full(dst, write, size, written, err):
    needed = size
    if needed is None:
        sink = _Counting()
        try:
            write(sink)
            needed = sink.bytes
        except Exception:  # noqa: BLE001  (a writer that needs a real file: say what was written)
            needed = None
    free = None
    with contextlib.suppress(OSError):
        st = os.statvfs(os.path.dirname(os.path.abspath(dst)))
        free = st.f_bavail * st.f_frsize
    return DiskFullError(dst, _FULL[err.errno], needed, written, free)


def atomic_copy(src, dst):
    def write(f):
        with open(src, "rb") as fsrc:
            shutil.copyfileobj(fsrc, f, 16 << 20)

    atomic_write(dst, write, size=os.path.getsize(src))


def _torch_persistent_save(original):
    def torch_persistent_save(obj, filename, async_write=False):
        if async_write or not isinstance(filename, (str, os.PathLike)) or not _is_local(filename):
            return original(obj, filename, async_write)
        atomic_write(filename, lambda f: torch.save(obj, f))

    return _wrap(original, torch_persistent_save)


class _AtomicCopyPathManager:
    """fairseq's PathManager for checkpoint_utils, with an atomic copy for local files."""

    def __getattr__(self, name):
        return getattr(PathManager, name)

    @staticmethod
    def copy(src_path, dst_path, overwrite=False):
        if not (_is_local(src_path) and _is_local(dst_path)):
            return PathManager.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        atomic_copy(src_path, dst_path)
        return True


# ----------------------------------------------------------------------------- install


_PEER_FAILURE = re.compile(r"Connection (reset|closed) by peer|Timed out waiting|NCCL communicator was aborted|"
                           r"Watchdog caught collective operation timeout|DistNetworkError|DistBackendError")


def _distributed_failure(value):
    """The one-line message for a collective that failed because a peer rank went away."""
    from .modules.expert_parallel import ExpertParallelError, _first_line as cause

    seen = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        if isinstance(value, ExpertParallelError):
            return str(value)
        if isinstance(value, RuntimeError) and _PEER_FAILURE.search(f"{type(value).__name__}: {value}"):
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else "?"
            return (f"a collective of the distributed job failed on rank {rank}: {cause(value)}. A peer rank "
                    f"died or stopped responding (read its log); this rank stops too. Restart the job with the same "
                    f"command and --save-dir to resume from checkpoint_last.pt")
        value = value.__cause__ or value.__context__
    return None


def _excepthook(previous):
    """A distributed failure as one line; everything else, user errors (CheckpointError among
    them) included, to ``previous``: errors.install_excepthook's hook, installed first."""
    def hook(kind, value, tb):
        failure = None if isinstance(value, UserError) else _distributed_failure(value)
        if failure is not None:
            where = traceback.extract_tb(tb)[-1] if tb is not None else None
            at = f" [{kind.__name__} at {os.path.basename(where.filename)}:{where.lineno} in {where.name}]" if where else ""
            print(f"error: {failure}{at}", file=sys.stderr, flush=True)
        else:
            previous(kind, value, tb)

    hook._fairseq_smoe = True
    return hook


def install():
    """Wrap fairseq's checkpoint functions (idempotent)."""
    cu = checkpoint_utils
    if not getattr(cu.load_checkpoint_to_cpu, "_fairseq_smoe", False):
        cu.load_checkpoint_to_cpu = _load_checkpoint_to_cpu(cu.load_checkpoint_to_cpu)
        cu.load_model_ensemble_and_task = _load_model_ensemble_and_task(cu.load_model_ensemble_and_task)
        cu.load_checkpoint = _load_checkpoint(cu.load_checkpoint)
        cu.torch_persistent_save = _torch_persistent_save(cu.torch_persistent_save)
        cu.PathManager = _AtomicCopyPathManager()
        cu.save_checkpoint = _save_checkpoint(cu.save_checkpoint)
        Trainer = fairseq_trainer.Trainer
        Trainer.load_checkpoint = _trainer_load_checkpoint(Trainer.load_checkpoint)
        Trainer.consolidate_optimizer = _trainer_consolidate_optimizer(Trainer.consolidate_optimizer)
        Trainer.state_dict = _trainer_state_dict(Trainer.state_dict)
        Trainer.save_checkpoint = _trainer_save_checkpoint(Trainer.save_checkpoint)
        Trainer.clip_grad_norm = _trainer_clip_grad_norm(Trainer.clip_grad_norm)
        fairseq_utils.clip_grad_norm_ = _clip_grad_norm_(fairseq_utils.clip_grad_norm_)
    if not getattr(sys.excepthook, "_fairseq_smoe", False):
        sys.excepthook = _excepthook(sys.excepthook)


install()
