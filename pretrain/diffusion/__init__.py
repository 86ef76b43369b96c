"""Rectified-flow training targets and ODE samplers for diffusion models."""
