"""User errors: one class, one line, one exit status.

A mistake the user can fix (a flag out of its domain, a file that is missing, damaged or not the
model's, data that does not fit) raises :class:`UserError` (or a subclass: ``CheckpointError``,
``RecipeError``, ``TranslatorError``, ...), whose message names the flag or file as the user typed
it, the problem and the fix. Every command-line entry point prints it as a single line

    error: <message>

on stderr and exits with status 1 (:data:`EXIT_USER_ERROR`), without a traceback:

* our own ``python -m fairseq_smoe.*`` / ``data_prep.*`` / ``scripts/*.py`` mains, through
  :func:`cli` (a decorator on ``main``);
* ``fairseq-train`` / ``-generate`` / ``-interactive`` with ``--user-dir fairseq_smoe``, through the
  ``sys.excepthook`` that :func:`install_excepthook` sets when the plugin is imported.

Anything else (a bug) keeps its traceback. Argparse's own usage errors keep argparse's status 2.
``docs/errors.md`` says what a user can expect.
"""

import contextlib
import functools
import importlib
import re
import sys

EXIT_USER_ERROR = 1


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A flag (or flag combination) outside its domain; the message names the flag as typed
    (``--smoe-max-passes``). Also a ``ValueError``, as these checks raised before."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the command needs is not there; the message names it and how to make
    it. Also a ``FileNotFoundError``, as these checks raised before."""


class UserExit(SystemExit):
    """What :func:`cli` raises after printing a :class:`UserError`: exit status 1, and
    ``str()`` gives the printed line (so ``pytest.raises(SystemExit, match=...)`` sees it)."""

    def __init__(self, line: str):
        super().__init__(EXIT_USER_ERROR)
        self.line = line

    def __str__(self):
        return self.line


def user_error_in(exc):
    """The first :class:`UserError` in ``exc``'s chain of causes (``raise ... from``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def line(err, prog=None) -> str:
    """``err`` as the one ``error:`` line (``prog: error: ...`` when a program name is given)."""
    prefix = f"{prog}: error:" if prog else "error:"
    text = " ".join(part.strip() for part in str(err).split("\n") if part.strip())
    return f"{prefix} {text}"


def report(err, prog=None) -> str:
    """Print ``err`` as the one ``error:`` line on stderr; return the line."""
    text = line(err, prog)
    print(text, file=sys.stderr, flush=True)
    return text


def cli(main=None, *, prog=None, returns=False):
    """Decorate an entry point's ``main(argv=None)``: a :class:`UserError` becomes one ``error:``
    line on stderr and exit status 1 (:class:`UserExit`; with ``returns=True``, for mains whose
    status is their return value, ``main`` returns 1 instead). Otherwise the return value of
    ``main`` is returned unchanged, and any other exception (a bug) propagates with its traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                text = report(err, prog)
                if returns:
                    return EXIT_USER_ERROR
                raise UserExit(text) from None

        return wrapped

    return wrap(main) if main is not None else wrap


@contextlib.contextmanager
def missing_files_are_user_errors():
    """A ``FileNotFoundError`` inside (fairseq's and a task's way to say that a data file is not
    there; its message names the file) becomes a :class:`MissingFileError` with that message.
    For a tool that hands a data directory to fairseq; usable as a decorator."""
    try:
        yield
    except FileNotFoundError as err:
        if isinstance(err, UserError):
            raise
        raise MissingFileError(str(err)) from err


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*): ?(.*)$")


def user_error_in_trace(trace: str):
    """The message of the last :class:`UserError` named in a formatted traceback (what
    ``torch.multiprocessing.spawn`` hands the parent of a failed worker), or None."""
    lines = trace.rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        m = _EXC_LINE.match(lines[i])
        if not m or "." not in m.group(1):
            continue
        module, _, name = m.group(1).rpartition(".")
        try:
            kind = getattr(importlib.import_module(module), name)
        except Exception:  # not an importable class: not ours
            continue
        if isinstance(kind, type) and issubclass(kind, UserError):
            return "\n".join([m.group(2), *lines[i + 1:]])
    return None


def install_excepthook():
    """Inside fairseq's own mains (the plugin imported by ``--user-dir``): an uncaught
    :class:`UserError` anywhere in the exception's chain prints as one line (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_fairseq_smoe_user_errors", False):
        return

    def hook(kind, value, tb):
        err = user_error_in(value)
        if err is None and kind.__name__ == "ProcessRaisedException":  # a worker of fairseq's spawn
            err = user_error_in_trace(str(value))
        if err is not None:
            report(err)
        else:
            previous(kind, value, tb)

    hook._fairseq_smoe_user_errors = True
    sys.excepthook = hook
