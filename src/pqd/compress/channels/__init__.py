"""Channels: coupled channel groups (Torch-Pruning), channel importance, physical channel removal
and resizing layers to a checkpoint's shapes."""
