"""Pretraining methods: each file owns its networks, config section, checks, transforms, FLOP count and
pictures, and exports one MethodSpec; registry.py lists them."""
