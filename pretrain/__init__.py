"""Continued pretraining with DeepSpeed: model, loop, checkpoints, evaluation, tracking, export."""
