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
"""

import functools
import sys

EXIT_USER_ERROR = 1


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


def user_error_in(exc):
    """The first :class:`UserError` in ``exc``'s chain of causes (``raise ... from``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report(err, prog=None):
    """Print ``err`` as the one ``error:`` line (``prog: error: ...`` when a program name is given)."""
    prefix = f"{prog}: error:" if prog else "error:"
    text = " ".join(str(err).split("\n")).strip()
    print(f"{prefix} {text}", file=sys.stderr, flush=True)


def cli(main=None, *, prog=None):
    """Decorate an entry point's ``main(argv=None)``: a :class:`UserError` becomes one ``error:``
    line and exit status 1; the return value of ``main`` is returned unchanged."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                report(err, prog)
                raise SystemExit(EXIT_USER_ERROR) from None

        return wrapped

    return wrap(main) if main is not None else wrap


def install_excepthook():
    """Inside fairseq's own mains (the plugin imported by ``--user-dir``): an uncaught
    :class:`UserError` anywhere in the exception's chain prints as one line (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_fairseq_smoe_user_errors", False):
        return

    def hook(kind, value, tb):
        err = user_error_in(value)
        if err is not None:
            report(err)
        else:
            previous(kind, value, tb)

    hook._fairseq_smoe_user_errors = True
    sys.excepthook = hook
