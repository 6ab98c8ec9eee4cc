"""Peer baselines: other tools' compression of the same teacher, evaluated and timed by pqd.

:mod:`pqd.peers.nncf_ptq`: post-training INT8 quantization by NNCF (``pip install 'pqd[peers]'``).
"""

from pqd.peers.nncf_ptq import NncfPtqConfig, nncf_ptq, peer_worker_spec, time_peer

__all__ = ["NncfPtqConfig", "nncf_ptq", "peer_worker_spec", "time_peer"]
