"""Transfers between host and device in the SMoE block, made visible.

On a GPU every read of a device value by the host (``.item()``, ``.tolist()``, ``nonzero``,
``bincount``'s output size, a boolean mask index, ...) waits for the stream to drain, and so
does a host-to-device copy from pageable memory (``torch.tensor(..., device=...)``). The block
does exactly one read per pass, on purpose, through ``read_to_host`` (the counts that size the
expert rows and find the next strata's tokens). Two ways to hold it to that:

* ``HostSyncAudit`` (any device, CPU included): records every *operation that transfers* on
  CUDA, whatever device it runs on, since on CPU there is no transfer to see. It counts:

  - operators that read a device value back (``_SYNCING``): ``.item()``/``bool()``/``int()``/
    ``float()`` of a tensor (``aten::_local_scalar_dense``), ``is_nonzero``, ``equal``,
    ``nonzero``, ``masked_select``, ``bincount``, the ``unique`` family, and
    ``repeat_interleave`` with tensor repeats and no ``output_size``;
  - indexing with a boolean (or uint8) mask, read or write (``aten::index`` /
    ``aten::index_put_`` with such an index: both call ``nonzero``); recorded as
    ``aten::index(mask)`` / ``aten::index_put_(mask)``;
  - a tensor made from Python data for a device: ``torch.tensor`` / ``torch.as_tensor`` /
    ``torch.asarray`` with a ``device`` given (recorded as ``torch.tensor(device=)``, ...),
    ``Tensor.new_tensor`` (its tensor's device), and indexing (read or write) with a Python
    list (``Tensor.__getitem__(list)``): each a host-to-device copy on CUDA (a tensor made on
    the host and moved later shows as ``Tensor.to(device)`` there);
  - ``Tensor.tolist``, ``Tensor.cpu``, ``Tensor.numpy``, ``Tensor.cuda`` (Python-level
    methods, which on CPU run no operator at all), and ``Tensor.to`` / ``aten::_to_copy`` /
    ``aten::copy_`` to another device (only a multi-device run has those);

  each once, by its outermost name (an operator inside a recorded method is not recorded
  again), in ``seen``; the deliberate reads of ``read_to_host`` go to ``reads`` instead. It does
  not see transfers inside a kernel (``torch._grouped_mm``'s fallback, which ``grouped.py``'s
  gate keeps out of the block) nor ones from code that bypasses the dispatcher; on a CUDA run it counts these
  operations on CPU tensors too (no transfer there). It sees the backward as well.

* ``cuda_sync_errors`` (CUDA only): ``torch.cuda.set_sync_debug_mode("error")`` while inside,
  so that any synchronising CUDA call raises, except the deliberate ``read_to_host``.
"""

from contextlib import contextmanager
from typing import Iterator, List

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_reads = [0]
_audits: List["HostSyncAudit"] = []  # the audits open (innermost last)
_sync_errors = [0]  # depth of cuda_sync_errors contexts


def read_to_host(t: Tensor) -> List[int]:
    """The one deliberate device-to-host read of a pass."""
    _reads[0] += 1
    if not _audits and not _sync_errors[0]:
        return t.tolist()
    for audit in _audits:
        audit.reads += 1
        audit._quiet += 1
    try:
        if _sync_errors[0] and t.is_cuda:
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return t.tolist()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return t.tolist()
    finally:
        for audit in _audits:
            audit._quiet -= 1


def host_reads() -> int:
    """Number of ``read_to_host`` calls in this process so far."""
    return _reads[0]


# Operators that read a device value back to the host on CUDA (their output size or value
# depends on data): found by CUDA's sync debug mode, listed here so that CPU runs catch them.
_SYNCING = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float() of a tensor
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::bincount",  # sizes its output from the maximum
    "aten::unique_dim",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
}
_MASK_INDEXED = {"aten::index", "aten::index_put_", "aten::_index_put_impl_"}
_FROM_PYTHON = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor", torch.asarray: "torch.asarray"}
# Tensor methods that transfer on CUDA but run no operator on CPU
_METHODS = {Tensor.tolist: "Tensor.tolist", Tensor.cpu: "Tensor.cpu", Tensor.numpy: "Tensor.numpy",
            Tensor.cuda: "Tensor.cuda", Tensor.__array__: "Tensor.__array__"}


def _is_mask(t) -> bool:
    return isinstance(t, Tensor) and t.dtype in (torch.bool, torch.uint8)


def _operator_sync(func, args, kwargs) -> str:
    """The name to record for an operator that transfers on CUDA, else ''."""
    name = func._schema.name
    if name in _SYNCING:
        return name
    if name == "aten::repeat_interleave":
        return name if func._overloadname != "self_int" and kwargs.get("output_size") is None else ""
    if name in _MASK_INDEXED:
        return f"{name}(mask)" if any(_is_mask(i) for i in (args[1] or ())) else ""
    if name == "aten::_to_copy":
        device = kwargs.get("device")
        return name if device is not None and torch.device(device) != args[0].device else ""
    if name == "aten::copy_":
        return name if args[0].device != args[1].device else ""
    return ""


def _has_list(index) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def _function_sync(func, args, kwargs) -> str:
    """The name to record for a Python-level call that transfers on CUDA, else ''."""
    name = _METHODS.get(func)
    if name:
        return name
    if func in _FROM_PYTHON:
        data_is_tensor = bool(args) and isinstance(args[0], Tensor)
        return f"{_FROM_PYTHON[func]}(device=)" if kwargs.get("device") is not None and not data_is_tensor else ""
    if func is Tensor.new_tensor:
        return "Tensor.new_tensor"
    if func in (Tensor.__getitem__, Tensor.__setitem__):
        return f"Tensor.{func.__name__}(list)" if _has_list(args[1]) else ""
    if func is Tensor.to and isinstance(args[0], Tensor):
        device = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        return "Tensor.to(device)" if device is not None and device != args[0].device else ""
    return ""


class _Functions(TorchFunctionMode):
    def __init__(self, audit: "HostSyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        audit = self.audit
        name = _function_sync(func, args, kwargs)
        if not name or audit._quiet:
            return func(*args, **kwargs)
        audit.seen.append(name)
        audit._quiet += 1  # the operators it runs are part of it
        try:
            return func(*args, **kwargs)
        finally:
            audit._quiet -= 1


class _Operators(TorchDispatchMode):
    def __init__(self, audit: "HostSyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.audit._quiet:
            name = _operator_sync(func, args, kwargs)
            if name:
                self.audit.seen.append(name)
        return func(*args, **kwargs)


class HostSyncAudit:
    """A context that records every operation run inside it (forward and backward) that
    transfers between host and device on CUDA, on CPU too: ``seen`` (names, in order; see the
    module docstring for exactly what it counts), and the deliberate ``read_to_host`` reads in
    ``reads``."""

    def __init__(self):
        self.seen: List[str] = []
        self.reads = 0
        self._quiet = 0
        self._modes = (_Functions(self), _Operators(self))

    def __enter__(self) -> "HostSyncAudit":
        for mode in self._modes:
            mode.__enter__()
        _audits.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _audits.remove(self)
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


@contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` inside (restored after): every synchronising
    CUDA call raises, except ``read_to_host``'s deliberate read. The mode is process-wide, so it
    covers the autograd engine's device threads. CUDA only."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    _sync_errors[0] += 1
    try:
        yield
    finally:
        _sync_errors[0] -= 1
        torch.cuda.set_sync_debug_mode(previous)
