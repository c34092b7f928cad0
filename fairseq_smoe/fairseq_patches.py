"""The plugin's one change to fairseq's own behaviour, kept here with its reason.

**torch DDP of a CPU model** (``--ddp-backend pytorch_ddp``/``c10d``, fairseq's default).
fairseq 0.12's ``DistributedFairseqModel`` builds ``torch.nn.parallel.DistributedDataParallel``
with ``device_ids=[args.device_id]`` (``fairseq/models/distributed_fairseq_model.py``), which torch
rejects for a module on the CPU ("device_ids and output_device arguments only work with
single-device/multiple-device GPU modules or CPU modules, but got device_ids [0] ..."): several
CPU processes (gloo) could only train with ``--ddp-backend legacy_ddp``. Here the name
``DistributedDataParallel`` in that fairseq module is a subclass of torch's that drops
``device_ids``/``output_device`` when every parameter of the module is on the CPU, as torch asks,
and passes everything through unchanged otherwise (a CUDA model is wrapped exactly as fairseq
does). ``tests/test_ddp.py`` fails if fairseq stops building DDP that way, or if the name stops
being the one fairseq uses, so that this patch is revisited rather than silently dead.

``install()`` is idempotent; importing the plugin's model module installs it.
"""

from torch.nn.parallel import DistributedDataParallel as TorchDDP


class CPUAwareDistributedDataParallel(TorchDDP):
    """torch's DDP; for a module whose parameters are all on the CPU, without ``device_ids``
    and ``output_device`` (which torch accepts only for GPU modules)."""

    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def install() -> None:
    from fairseq.models import distributed_fairseq_model as dfm

    if dfm.DistributedDataParallel is TorchDDP:
        dfm.DistributedDataParallel = CPUAwareDistributedDataParallel

