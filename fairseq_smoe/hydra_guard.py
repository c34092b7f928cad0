"""``fairseq-hydra-train`` is refused with one line that gives the equivalent ``fairseq-train`` command.

Why not support it: fairseq 0.12.3's hydra entry point can build a task only from a dataclass
config (``TASK_DATACLASS_REGISTRY``), and ``smoe_translation`` extends fairseq's
``translation_multi_simple_epoch``, whose ~40 options exist only as argparse flags (``add_args``)
and are read from one flat Namespace by ``MultilingualDatasetManager``; stock fairseq fails on it
with "Could not infer task type". The ``smoe_transformer*`` models are argparse models too (under
hydra they die later with "invalid argument moe_freq"). Making them work would mean either
re-declaring the parent task's options as a dataclass (a copy of stock fairseq to keep in step) or
flattening the hydra config into a Namespace behind fairseq's back: a second configuration path
that every recipe, script and test would have to keep equivalent to ``fairseq-train``, for no
gain. So the plugin refuses it at the first point where it can (``tasks.setup_task``, right after
fairseq imports ``common.user_dir``, before any data is read) and prints the ``fairseq-train``
command with the same settings.

The refusal fires only when a plugin task or model arrives as an OmegaConf config, which only a
hydra config produces: ``fairseq-train`` hands argparse tasks and models over as a Namespace,
and checkpoints keep that Namespace.
"""

import argparse
import shlex

from fairseq import tasks
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

PLUGIN = __package__
# the fairseq-train flag naming the component of each config group
COMPONENTS = {"task": "--task", "model": "--arch", "criterion": "--criterion", "optimizer": "--optimizer",
              "lr_scheduler": "--lr-scheduler", "bpe": "--bpe", "tokenizer": "--tokenizer",
              "scoring": "--scoring"}
# config groups that are fairseq-train options, in the order their values win when names repeat
GROUPS = ["task", "model", "criterion", "optimizer", "lr_scheduler", "common", "dataset",
          "distributed_training", "optimization", "checkpoint", "ema", "bpe", "tokenizer", "scoring"]


class HydraNotSupported(CompactHydraException, RuntimeError):
    """Printed by hydra as its message alone (HYDRA_FULL_ERROR=1 for the traceback)."""


def _ours(cls):
    return cls is not None and cls.__module__.split(".")[0] == PLUGIN


def plugin_parts(root):
    """The plugin's argparse-only task / model named by a hydra config, e.g. ['task smoe_translation']."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_DATACLASS_REGISTRY, MODEL_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    parts = []
    task = root.get("task") if OmegaConf.is_config(root) else None
    if OmegaConf.is_config(task):
        name = task.get("_name")
        if name not in TASK_DATACLASS_REGISTRY and _ours(TASK_REGISTRY.get(name)):
            parts.append(f"task {name}")
    model = root.get("model") if OmegaConf.is_config(root) else None
    if OmegaConf.is_config(model):
        name = model.get("_name")
        cls = ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)
        if _ours(cls) and not any(MODEL_DATACLASS_REGISTRY.get(n) for n, c in MODEL_REGISTRY.items() if c is cls):
            parts.append(f"model {name}")
    return parts


def _render(value, default=None):
    if isinstance(value, (list, tuple)):
        if isinstance(default, str) and default.strip().startswith("("):
            return "(" + ", ".join(map(str, value)) + ")"
        return ",".join(map(str, value))
    return str(value)


def equivalent_command(root):
    """The fairseq-train command line with the settings of a composed fairseq hydra config."""
    from fairseq import options

    cfg = OmegaConf.to_container(root, resolve=True)
    head = []
    data = (cfg.get("task") or {}).get("data")
    if (cfg.get("common") or {}).get("user_dir"):
        head += ["--user-dir", str(cfg["common"]["user_dir"])]
    for group, flag in COMPONENTS.items():
        name = (cfg.get(group) or {}).get("_name") if isinstance(cfg.get(group), dict) else None
        if name:
            head += [flag, str(name)]
    values, origin = {}, {}
    for group in GROUPS:
        for key, value in (cfg.get(group) or {}).items() if isinstance(cfg.get(group), dict) else ():
            if key in ("_name", "data") or key in values:
                continue
            values[key], origin[key] = value, group
    parser = options.get_training_parser(default_task=(cfg.get("task") or {}).get("_name") or "translation")
    args, _ = options.parse_args_and_arch(parser, [str(data or "DATA")] + head, parse_known=True)
    tail, used = [], {"data", "user_dir", *[f[2:].replace("-", "_") for f in COMPONENTS.values()],
                      "lr_scheduler"}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        dest = action.dest
        if not longs or dest in used or dest not in values:
            continue
        used.add(dest)
        value, default = values[dest], getattr(args, dest, None)
        tokens = []
        if isinstance(action, argparse._StoreTrueAction):
            tokens = [longs[0]] if value is True and default is not True else []
        elif isinstance(action, argparse._StoreFalseAction):
            tokens = [longs[0]] if value is False and default is not False else []
        elif value is not None and value != default and (
                default is None or _render(value, default) != _render(default, default)):
            tokens = [longs[0], _render(value, default)]
        if tokens:
            tail.append((GROUPS.index(origin[dest]), tokens))
    left_out = [f"{origin[k]}.{k}" for k in values if k not in used and origin[k] in ("task", "model")]
    tail = [t for _, tokens in sorted(tail, key=lambda item: item[0]) for t in tokens]
    command = shlex.join(["fairseq-train", str(data or "DATA")] + head + tail)
    if left_out:
        command += f"   (left out, not fairseq-train options: {', '.join(left_out)})"
    return command


def refusal(root, parts):
    try:
        command = equivalent_command(root)
    except BaseException as err:  # noqa: BLE001  (the refusal must come out even if rendering fails)
        command = ("fairseq-train DATA --user-dir PATH/fairseq_smoe --task smoe_translation --arch ... "
                   f"(each hydra key group.name=value as --name value; the command could not be built: {err})")
    return (f"error: fairseq-hydra-train cannot run this plugin's {' and '.join(parts)}: fairseq 0.12.3 builds "
            f"hydra tasks and models only from dataclasses, and smoe_translation (a "
            f"translation_multi_simple_epoch) and the smoe_transformer models take argparse flags only. Run the same training "
            f"with fairseq-train (or scripts/train.sh CONFIG DATA SAVE_DIR): {command}")


def _setup_task(original):
    def setup_task(cfg, **kwargs):
        if OmegaConf.is_config(cfg):
            root = cfg._get_root()
            if root is cfg:  # a task config on its own
                root = OmegaConf.create({"task": cfg})
            parts = plugin_parts(root)
            if parts:
                raise HydraNotSupported(refusal(root, parts))
        return original(cfg, **kwargs)

    setup_task.__wrapped__ = original
    setup_task._fairseq_smoe = True
    return setup_task


def install():
    if not getattr(tasks.setup_task, "_fairseq_smoe", False):
        tasks.setup_task = _setup_task(tasks.setup_task)


install()
