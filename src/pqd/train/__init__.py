"""The one training loop every stage uses, its LR schedule, and atomic checkpoints."""

from pqd.train.checkpoint import load_checkpoint, save_checkpoint
from pqd.train.loop import apply_masks, train
from pqd.train.schedule import lr_at

__all__ = ["apply_masks", "load_checkpoint", "lr_at", "save_checkpoint", "train"]
