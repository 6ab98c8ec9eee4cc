"""Measurement: accuracy, bytes on disk, wall-clock CPU latency, and the environment."""

from pqd.measure.accuracy import agreement, predict, top1
from pqd.measure.env import environment
from pqd.measure.faithfulness import faithfulness, mcnemar
from pqd.measure.latency import Blocks, measure_latency
from pqd.measure.proxies import proxies
from pqd.measure.size import file_bytes
from pqd.measure.speedup import speedup_summary
from pqd.measure.stats import mcnemar_paired, top1_record

__all__ = ["Blocks", "agreement", "environment", "faithfulness", "file_bytes", "mcnemar", "mcnemar_paired", "measure_latency",
           "predict", "proxies", "speedup_summary", "top1", "top1_record"]
