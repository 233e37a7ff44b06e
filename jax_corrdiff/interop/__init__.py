"""Reading PyTorch / PhysicsNeMo checkpoints without torch.

The readers here import neither torch nor JAX; :mod:`jax_corrdiff.interop.physicsnemo`
(which builds JAX models from ``.mdlus`` files) is imported on its own.
"""

from jax_corrdiff.interop.errors import (
    CheckpointFormatError,
    CheckpointLimitError,
    ReadLimits,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from jax_corrdiff.interop.mdlus import MdlusArchive, read_mdlus
from jax_corrdiff.interop.torch_pickle import load_torch_checkpoint

__all__ = [
    "CheckpointFormatError",
    "CheckpointLimitError",
    "MdlusArchive",
    "ReadLimits",
    "UnsafePickleError",
    "UnsupportedCheckpointError",
    "load_torch_checkpoint",
    "read_mdlus",
]
