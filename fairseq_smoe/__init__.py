"""fairseq-smoe: Stratified Mixture of Experts (Xu et al., 2023) as a fairseq user-dir plugin.

``fairseq-train --user-dir fairseq_smoe`` registers the ``smoe_transformer`` model and
architectures, the ``smoe_label_smoothed_cross_entropy`` criterion and the
``smoe_translation`` task. ``SMoETranslator`` (``fairseq_smoe.translator``) translates and shows
the routing from Python.
"""

import argparse

import torch

# fairseq 0.12.x pickles an argparse.Namespace in every checkpoint; torch >= 2.6 loads with
# weights_only=True, so allow exactly that class instead of turning the safe loader off.
torch.serialization.add_safe_globals([argparse.Namespace])

from . import errors  # noqa: E402  (one error line for user mistakes inside fairseq's mains)

errors.install_excepthook()

from . import checkpoint_io, hydra_guard  # noqa: E402,F401  (checked checkpoint reads, atomic saves; hydra refusal)
from . import criterions, models, tasks  # noqa: E402,F401  (registrations)
from .translator import SMoETranslator  # noqa: E402,F401  (the Python API)

__version__ = "0.1.0"
