"""Compat shim, removed at merge: the module is activation_checkpoint.py now (activation
checkpointing, not to be confused with ct_stages/checkpoint.py's training checkpoints). Kept only
for the importers held by the loss-path rewrite (__init__.py, factory.py, parallelize.py)."""

from .activation_checkpoint import ActivationCheckpointConfig, apply_activation_checkpointing  # noqa: F401
