"""Pretraining loop, DeepSpeed wiring, checkpoints and metrics."""
