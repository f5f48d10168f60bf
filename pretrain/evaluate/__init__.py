"""Downstream evaluation: task files (YAML + the user's JSONL), scoring by log-likelihood and greedy
generation, backends for a Megatron model at any TP/PP and a Hugging Face folder, and export of the
same tasks as lm-evaluation-harness task YAMLs."""
