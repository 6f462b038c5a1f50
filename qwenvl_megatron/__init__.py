"""qwenvl-megatron: the Qwen-VL vision-language model (arXiv 2308.12966) trained on Megatron-Core."""
__version__ = "0.1.0"

# Before anything imports megatron-core: its warnings about absent Transformer Engine / apex become one
# note per process (runtime/layer_impl.py). Imports only `warnings` and the like, not torch.
from .runtime.layer_impl import quiet_megatron_fallback_warnings as _quiet

_quiet()
del _quiet
