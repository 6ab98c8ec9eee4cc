"""Compression primitives usable in any training loop: unstructured sparsity, INT8 quantization,
distillation losses, channel (structured) pruning and the student state."""
