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
``NAME.tmp``, overwritten by the next save).
"""

import argparse
import contextlib
import contextvars
import os
import re
import shutil
import sys
import traceback
import zipfile

import torch
from fairseq import checkpoint_utils, trainer as fairseq_trainer
from fairseq.file_io import PathManager


class CheckpointError(RuntimeError):
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
    """torch.load a fairseq checkpoint (weights_only stays on); CheckpointError if it is not one."""
    path = str(path)
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
        local = _is_local(path)
        try:
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
        building = _building.get()
        if building is not None:
            found = _registration_problem(path, state, building["need_task"])
            if found:
                raise found
        _last_read[0] = str(path)
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
        token = _resuming.set(str(filename))
        try:
            return original(self, filename, *args, **kwargs)
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


# ----------------------------------------------------------------------------- atomic writing


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(dst, write):
    """write(f) into dst.tmp, fsync, os.replace over dst: dst is always the old or the new file."""
    dst = str(dst)
    tmp = dst + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def atomic_copy(src, dst):
    def write(f):
        with open(src, "rb") as fsrc:
            shutil.copyfileobj(fsrc, f, 16 << 20)

    atomic_write(dst, write)


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


def _excepthook(previous):
    def hook(kind, value, tb):
        if isinstance(value, CheckpointError):
            print(f"error: {value}", file=sys.stderr, flush=True)
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
        Trainer = fairseq_trainer.Trainer
        Trainer.load_checkpoint = _trainer_load_checkpoint(Trainer.load_checkpoint)
    if not getattr(sys.excepthook, "_fairseq_smoe", False):
        sys.excepthook = _excepthook(sys.excepthook)


install()
