"""Hot-path kernels with PyTorch reference implementations that define what "correct" means."""
