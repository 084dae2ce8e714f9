"""Storage that does not know the network: pickle-free states, checkpoint directories, run directories.

``ddpmkit.run.Run`` puts these together with the U-Net and the diffusion settings.
"""

from .checkpoint import (Checkpoint, Location, check_state_matches, latest_checkpoint, list_checkpoints,
                         load_checkpoint, locate, prune_checkpoints, save_checkpoint, verify_checkpoint)
from .rundir import CHECKPOINTS_DIR, CONFIG_NAME, prepare_run_dir, read_config, write_config
from .state import atomic_save_safetensors, load_safetensors, load_state, save_state

__all__ = [
    "Checkpoint",
    "Location",
    "CONFIG_NAME",
    "CHECKPOINTS_DIR",
    "atomic_save_safetensors",
    "load_safetensors",
    "save_state",
    "load_state",
    "save_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "load_checkpoint",
    "locate",
    "check_state_matches",
    "read_config",
    "write_config",
    "prepare_run_dir",
]
