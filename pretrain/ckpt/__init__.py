"""Checkpoint tools on top of the checkpoint store (pretrain/checkpoint.py): rebuild a trained method (load.py),
inspect, export and convert (one file each), and their command line (cli.py)."""
