"""Peer baselines: other tools' compression of the same teacher, evaluated and timed by pqd.

:mod:`pqd.commands.peers.nncf_ptq`: post-training INT8 quantization by NNCF (``pip install 'pqd[peers]'``).
:func:`peer_run`: a peer baseline as one run of a sweep (teacher weights in, metrics.json out).
"""

from pqd.commands.peers.nncf_ptq import NncfPtqConfig, nncf_ptq, peer_worker_spec, time_peer
from pqd.commands.peers.run import PEERS, peer_run

__all__ = ["PEERS", "NncfPtqConfig", "nncf_ptq", "peer_run", "peer_worker_spec", "time_peer"]
