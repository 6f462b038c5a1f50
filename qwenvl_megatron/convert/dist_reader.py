"""Full model tensors read straight from a Megatron dist-checkpoint (torch_dist), one at a time.

An export does not need the model loaded: the checkpoint stores every tensor under its global name, TP
pieces as chunks at their global offsets (the gated MLP's fc1 as [gate; up] whole, the vocabulary padded),
decoder layers stacked on a leading axis. Reading the chunks that cover one tensor gives it in full form
whatever layout saved it, with no collective and no more memory than that tensor.
"""
from __future__ import annotations

import os
import re

import torch

_LAYER = re.compile(r"^((?:language|vision)\.decoder\.layers)\.(\d+)\.(.+)$")


class DistCheckpointError(ValueError):
    pass


class DistCheckpointReader:
    """`full(name, keys_map)`: the tensor under a model name (global layer numbers) in full form."""

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader
        self.dir = ckpt_dir
        self.md = FileSystemReader(ckpt_dir).read_metadata()
        self.tensors = {k: v for k, v in self.md.state_dict_metadata.items() if hasattr(v, "chunks")}

    def storage_key(self, name: str, keys_map: dict[str, str]) -> tuple[str, int | None]:
        """Model name -> (checkpoint key, layer index or None); `keys_map` is the layers' own renaming
        (the local spec stores its norms under Transformer Engine's fused names)."""
        m = _LAYER.match(name)
        if not m:
            return name, None
        rest = m.group(3)
        for old, new in keys_map.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"{m.group(1)}.{rest}", int(m.group(2))

    def full(self, name: str, keys_map: dict[str, str]) -> torch.Tensor:
        key, layer = self.storage_key(name, keys_map)
        meta = self.tensors.get(key)
        if meta is None:
            raise DistCheckpointError(f"checkpoint {self.dir} has no tensor {key} (for {name})")
        size = tuple(meta.size)
        if layer is None:
            return self.box(key, (0,) * len(size), size)
        if layer >= size[0]:
            raise DistCheckpointError(f"checkpoint {self.dir}: {key} has {size[0]} layers, {name} asks for {layer}")
        return self.box(key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]

    def box(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The [offsets, offsets + sizes) box of global tensor `key`, from the chunks that overlap it."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        meta = self.tensors[key]
        out, covered = None, 0
        for chunk in meta.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            piece = self._read(self.md.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))], key)
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                return piece  # the box is one stored chunk: no copy
            if out is None:
                out = torch.empty(sizes, dtype=meta.properties.dtype, device="cpu")
            src, dst = piece, out
            for d, (a, b) in enumerate(zip(lo, hi)):
                src = src.narrow(d, a - chunk.offsets[d], b - a)
                dst = dst.narrow(d, a - offsets[d], b - a)
            dst.copy_(src)
            covered += src.numel()
            del piece
        n = 1
        for s in sizes:
            n *= s
        if covered != n:
            raise DistCheckpointError(f"checkpoint {self.dir}: the chunks of {key} cover {covered} of the {n} "
                                      f"elements at {offsets}")
        return out

    def _read(self, info, key: str) -> torch.Tensor:
        """One stored chunk as a tensor over the file's mapping (no copy: its pages are read as the export
        writes them, and stay mapped only while the tensor lives). torch.save's record is opened for its
        layout alone (map_location meta gives dtype, shape, strides and the data's offset in the record)."""
        from torch.distributed.checkpoint.filesystem import _create_file_view
        if info.transform_descriptors:
            raise DistCheckpointError(f"checkpoint {self.dir}: {key} is stored with transforms "
                                      f"{info.transform_descriptors}, which this reader does not apply")
        path = os.path.join(self.dir, info.relative_path)
        with open(path, "rb") as f:
            meta = torch.load(_create_file_view(f, info.offset, info.length), map_location="meta", weights_only=True)
        if not isinstance(meta, torch.Tensor):
            raise DistCheckpointError(f"checkpoint {self.dir}: {key} is stored as {type(meta).__name__}, not a tensor")
        start = info.offset + meta.untyped_storage()._checkpoint_offset
        nbytes = meta.untyped_storage().nbytes()
        if start + nbytes > info.offset + info.length:
            raise DistCheckpointError(f"checkpoint {self.dir}: {key}'s data runs past its record in {path}")
        whole = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))  # mapped (private), not read
        out = torch.empty(0, dtype=meta.dtype)
        return out.set_(whole[start:start + nbytes], meta.storage_offset(), meta.shape, meta.stride())


def layer_keys_map(model) -> dict[str, str]:
    """The decoder layers' checkpoint renaming (the same for the LLM and the ViT layers of one spec)."""
    for block in (getattr(getattr(model, part, None), "decoder", None) for part in ("language", "vision")):
        for layer in getattr(block, "layers", []):
            return dict(layer.submodules_config.sharded_state_dict_keys_map)
    return {}
