"""Pretraining system: configs, models, methods, engines, the train loop, checkpoints, tracking and evaluation."""
