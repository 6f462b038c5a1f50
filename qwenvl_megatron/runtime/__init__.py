"""Process groups, devices, the CPU compatibility layer and the choice of layer implementation."""
from .cpu_compat import enable_cpu_compat
from .device_discipline import HostTensorError, device_discipline, misplaced_tensors
from .distributed import device, initialize
from .layer_impl import backend_provider, have_apex, have_dali, have_transformer_engine, resolve_impl

__all__ = ["enable_cpu_compat", "device", "initialize", "device_discipline", "misplaced_tensors", "HostTensorError",
           "backend_provider", "have_apex", "have_dali", "have_transformer_engine", "resolve_impl"]
