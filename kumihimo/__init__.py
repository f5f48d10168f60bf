"""kumihimo: pretrain Japanese LLMs on Megatron-Core, from raw corpus to a Hugging Face model."""

__version__ = "0.1.0"
