"""The training process's view of its job: where it sits (world.py), how it is asked to stop
(preemption.py) and how a hang is detected (watchdog.py). Below both the train loop and the launchers."""
