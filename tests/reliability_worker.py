"""`pretrain train` whose optimizer steps take at least SLOW_STEP_S seconds, so a test can kill the
process at a chosen point (right after a checkpoint) before it finishes.

    python tests/reliability_worker.py train CONFIG --set ...   (any `pretrain` command line)
"""

from __future__ import annotations

import os
import sys
import time

from pretrain.cli import main
from pretrain.train import Trainer

_step = Trainer.train_step


def slow_train_step(self, *args, **kwargs):
    stats = _step(self, *args, **kwargs)
    time.sleep(float(os.environ.get("SLOW_STEP_S", "0.2")))
    return stats


Trainer.train_step = slow_train_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
