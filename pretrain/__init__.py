"""Pretraining on Megatron-Core: config, model, parallel layout, training loop, checkpoints."""
