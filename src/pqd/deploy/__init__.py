"""Deployable files: ONNX export primitives, TorchScript deployables, the compact .pqdz format, runtimes."""
