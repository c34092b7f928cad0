"""Device-to-host reads of the SMoE block, made visible.

On a GPU every read of a device value by the host (``.item()``, ``.tolist()``, ``nonzero``,
``bincount``'s output size, a boolean mask index, ...) waits for the stream to drain. The block
does exactly one per pass, on purpose, through ``read_to_host`` (the counts that size the expert
rows and find the next strata's tokens); ``HostSyncAudit`` catches any other, on CPU too (it
watches for the operators that read back on CUDA), so a test can hold the block to that.
"""

from typing import List

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_reads = [0]


def read_to_host(t: Tensor) -> List[int]:
    """The one deliberate device-to-host read of a pass."""
    _reads[0] += 1
    return t.tolist()


def host_reads() -> int:
    """Number of ``read_to_host`` calls in this process so far."""
    return _reads[0]


# Operators that read a device value back to the host on CUDA (their output size or value
# depends on data): found by CUDA's sync debug mode, listed here so that CPU runs catch them.
_SYNCING = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float() of a tensor
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",  # also behind boolean-mask indexing and masked_select
    "aten::masked_select",
    "aten::bincount",  # sizes its output from the maximum
    "aten::unique_dim",
    "aten::_unique2",
    "aten::unique_consecutive",
}


class HostSyncAudit(TorchDispatchMode):
    """Records every operator run inside it that reads back to the host on CUDA (``seen``);
    ``repeat_interleave`` counts only without ``output_size`` (with it, nothing is read)."""

    def __init__(self):
        super().__init__()
        self.seen: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNCING or (name == "aten::repeat_interleave" and func._overloadname != "self_int"
                                and kwargs.get("output_size") is None):
            self.seen.append(name)
        return func(*args, **kwargs)
