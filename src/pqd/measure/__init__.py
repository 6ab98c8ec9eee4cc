"""Measurement: accuracy, bytes on disk, wall-clock CPU latency, and the environment."""

from pqd.measure.accuracy import agreement, predict, top1
from pqd.measure.env import environment
from pqd.measure.faithfulness import faithfulness, mcnemar
from pqd.measure.latency import Blocks, measure_latency
from pqd.measure.proxies import proxies
from pqd.measure.size import file_bytes

__all__ = ["Blocks", "agreement", "environment", "faithfulness", "file_bytes", "mcnemar", "measure_latency", "predict", "proxies", "top1"]
