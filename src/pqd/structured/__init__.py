"""Structured (channel) pruning chosen by latency measured on the target runtime.

``graph``: coupled channel groups (Torch-Pruning) and physical channel removal;
``importance``: channel scores; ``sensitivity``: per-group / per-layer accuracy drop;
``latency_model``: INT8 latency measured on the deployment runtime, fitted and cached;
``search``: per-group widths under a latency budget, measured in the loop;
``select``: several width recipes under one target, ranked by accuracy after adaptive BN.
"""
