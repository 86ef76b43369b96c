"""Experiment tracking: MLflow logging that can neither stall nor crash the training loop.

The training thread only appends to an in-memory outbox (outbox.py). One daemon thread
(worker.py) owns every MLflow call: it creates or resumes the run lazily, batches what was
queued, and keeps it (bounded) across server outages until the server answers again.
"""

from pretrain.tracking.store import local_tracking_uri, resolve_tracking_uri
from pretrain.tracking.tracker import Tracker, flatten_config

__all__ = ["Tracker", "flatten_config", "local_tracking_uri", "resolve_tracking_uri"]
