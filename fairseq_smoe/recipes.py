"""Named training recipes: ``configs/<benchmark>/<system>.conf`` files of fairseq flags.

Format: fairseq command-line flags, any number per line; ``#`` starts a comment; a line
``@include FILE`` inserts another config (path relative to the including file). Later flags
override earlier ones, as on the fairseq command line, so a system config includes its
benchmark's ``_base.conf`` and adds the model flags. A line ``@global-batch-tokens N`` asks
for ``--update-freq`` to be derived so that world_size x --max-tokens x update_freq >= N
(the paper: 32 GPUs x 4096 tokens = 131072).

    python -m fairseq_smoe.recipes m4/smoe-2-2-2-2 [--world-size 8]   # the flags, one per line
"""

import shlex
import sys
from pathlib import Path

from . import errors
from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class RecipeError(UserError, ValueError):
    pass


def config_path(name: str) -> Path:
    """``m4/smoe-2-2-2-2`` (or a path to a .conf file) -> the file."""
    path = Path(name)
    if path.suffix == ".conf" and path.exists():
        return path
    path = CONFIG_DIR / f"{name}.conf"
    if not path.exists():
        known = sorted(str(p.relative_to(CONFIG_DIR).with_suffix(""))
                       for p in CONFIG_DIR.rglob("*.conf") if not p.name.startswith("_"))
        raise RecipeError(f"no config {name!r} (looked for {path}); known configs: {', '.join(known)}")
    return path


def load_config(name: str, _seen=()) -> tuple:
    """(fairseq flags as an argv list, settings from ``@`` directives), includes expanded."""
    path = config_path(name).resolve()
    if path in _seen:
        raise RecipeError(f"{path} includes itself")
    args, settings = [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] == "@include" and len(parts) == 2:
            more, more_settings = load_config(str(path.parent / parts[1]), _seen + (path,))
            args += more
            settings.update(more_settings)
        elif parts[0] == "@global-batch-tokens" and len(parts) == 2 and parts[1].isdigit():
            settings["global_batch_tokens"] = int(parts[1])
        elif parts[0].startswith("@"):
            raise RecipeError(f"{path}:{n}: unknown directive {line!r} "
                              f"(known: '@include FILE', '@global-batch-tokens N')")
        else:
            try:
                args += shlex.split(line)
            except ValueError as err:  # shlex: "No closing quotation", "No escaped character"
                raise RecipeError(f"{path}:{n}: {err.args[0] if err.args else err} in {line!r}; quote "
                                  f"flag values as on a shell command line") from None
    return args, settings


def training_flags(name: str, world_size: int = 1, log=None) -> list:
    """A config's flags for ``world_size`` workers, with ``--update-freq`` derived from
    ``@global-batch-tokens`` (the arithmetic goes to ``log``)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise RecipeError(f"--world-size {world_size}: the number of training workers must be at least 1")
    args, settings = load_config(name)
    target = settings.get("global_batch_tokens")
    if target:
        value = flag_value(args, "--max-tokens", 0)
        try:
            max_tokens = int(value)
        except ValueError:
            raise RecipeError(f"{name}: --max-tokens {value!r} is not an integer") from None
        if max_tokens <= 0:
            raise RecipeError(f"{name}: @global-batch-tokens needs --max-tokens in the config")
        update_freq = max(1, -(-target // (world_size * max_tokens)))
        args += ["--update-freq", str(update_freq)]
        if log:
            log(f"global batch: {world_size} workers x {max_tokens} tokens x update-freq "
                f"{update_freq} = {world_size * max_tokens * update_freq} tokens "
                f"(target {target})")
    return args


def flag_value(args: list, flag: str, default=None):
    """The last value given to ``flag`` in an argv list (fairseq's 'last one wins')."""
    value = default
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


@errors.cli
def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="print a config's fairseq flags, one per line")
    p.add_argument("config", help="e.g. m4/smoe-2-2-2-2, or a path to a .conf file")
    p.add_argument("--world-size", type=int, default=1, help="number of training workers (GPUs)")
    a = p.parse_args(argv)
    flags = training_flags(a.config, a.world_size, log=lambda m: print(m, file=sys.stderr))
    print("\n".join(flags))


if __name__ == "__main__":
    main()
