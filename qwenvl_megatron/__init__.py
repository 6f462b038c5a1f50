"""qwenvl-megatron: the Qwen-VL vision-language model (arXiv 2308.12966) trained on Megatron-Core."""
__version__ = "0.1.0"
