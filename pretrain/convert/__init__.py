"""Checkpoint conversion between Megatron-Core (torch_dist, any TP/PP) and Hugging Face Llama.

    kumihimo convert to-hf   --checkpoint DIR --output DIR     (pretrain.convert.to_hf.convert_to_hf)
    kumihimo convert from-hf --model DIR --output DIR --tp T   (pretrain.convert.from_hf.convert_from_hf)

The tensor names and transforms of both directions live in one table, `pretrain.convert.mapping`.
"""
