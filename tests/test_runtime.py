"""The CPU compatibility layer and the choice of layer implementation."""
import sys

import pytest
import torch

from qwenvl_megatron.runtime import cpu_compat, layer_impl


def test_cuda_requests_land_on_cpu():
    assert cpu_compat.enable_cpu_compat() is True
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # what megatron's optimizer asserts
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # a no-op, not an error


def test_rng_tracker_streams_are_seeded_and_isolated():
    from megatron.core import tensor_parallel
    cpu_compat.enable_cpu_compat()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("a", 11)
    tracker.add("b", 12)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.rand(3)
    with tracker.fork("b"):
        b1 = torch.rand(3)
    with tracker.fork("a"):
        a2 = torch.rand(3)  # the stream continues where it stopped
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is untouched
    g = torch.Generator().manual_seed(11)
    assert torch.equal(torch.cat([a1, a2]), torch.rand(6, generator=g))
    assert not torch.equal(a1, b1)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("c", 11)


def test_noop_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_mode", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.enable_cpu_compat() is False
    assert cpu_compat._mode is None


def test_impl_choice_on_cpu():
    assert layer_impl.resolve_impl("auto") == "local"
    assert layer_impl.resolve_impl("local") == "local"
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        layer_impl.resolve_impl("te")
    with pytest.raises(ValueError, match="--transformer-impl"):
        layer_impl.resolve_impl("fast")


def test_broken_optional_package_counts_as_absent(monkeypatch):
    """An installed-but-broken TE (e.g. missing CUDA libraries) raises a non-ImportError at import."""

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "transformer_engine" or name.startswith("transformer_engine."):
                raise RuntimeError("cudnn shared object not found")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    layer_impl.have_transformer_engine.cache_clear()
    try:
        assert layer_impl.have_transformer_engine() is False
    finally:
        layer_impl.have_transformer_engine.cache_clear()
