"""The three conversions, run on every rank of a TP x PP group (megatron parallel state already set up).

- `hf_to_mcore`: HF Qwen-VL directory -> Megatron dist-checkpoint. Each rank reads from the shards only
  the HF tensors its own pieces are built from.
- `mcore_to_hf`: Megatron checkpoint (any saved layout: dist-checkpoints reshard on load) -> HF
  directory. Each pipeline stage gathers its tensors over TP and writes its own safetensors shards.
- `import_init`: stage-1 initialisation: LLM from a Qwen-7B HF directory, ViT from OpenCLIP
  ViT-bigG/14, adapter (and Qwen-VL's ln_post/proj) freshly initialised by the model itself.

Conversion models always use the local layer spec: on disk it is the same as Transformer Engine's (the
local spec maps its norm keys to TE's fused names), and it needs no GPU.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.config import QwenVLConfig, qwen_vl_7b
from ..models.parallel import ParallelPlan
from ..models.qwen_vl import QwenVLModel
from .hf_checkpoint import (DEFAULT_CODE_REPO, DTYPES, HFCheckpointError, HFCheckpointReader, HFShardWriter, check_against_config,
                            finalize_hf_dir, read_hf_config, spec_nbytes)
from .hf_layout import hf_key_shapes, hf_keys, hf_sources, hf_to_model, model_to_hf
from .openclip import check_openclip, imported_openclip_keys, openclip_to_model, read_openclip_visual
from .sharding import VOCAB_KEYS, _global_names, shard


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def build_stage(cfg: QwenVLConfig, dtype: torch.dtype, init: bool = True) -> QwenVLModel:
    """This rank's pipeline stage of the model under the current parallel state, in eval mode. With
    `init=False` megatron's weights are allocated but not initialised (for a caller that fills them all:
    untouched pages cost neither time nor memory)."""
    plan = ParallelPlan(tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
                        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
                        params_dtype=dtype, bf16=dtype == torch.bfloat16, impl="local", init_weights=init)
    model = QwenVLModel(cfg, plan, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    if not init:
        _mark_split_weights(model)
    return model.eval()


def _mark_split_weights(model: torch.nn.Module) -> None:
    """megatron records how a weight is split (`tensor_model_parallel`, `partition_dim`) only while
    initialising it; without initialisation the split is recorded here, as megatron would."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding, set_tensor_model_parallel_attributes)
    splits = ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1))
    for m in model.modules():
        dim = next((d for cls, d in splits if isinstance(m, cls)), None)
        if dim is not None and getattr(m, "weight", None) is not None:
            set_tensor_model_parallel_attributes(m.weight, True, dim, 1)


def rank_model_keys(model: QwenVLModel) -> list[str]:
    """Full names (global layer numbers) of the tensors this rank holds pieces of."""
    return list(_global_names(model).values())


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}


def _stage_tensors(model: QwenVLModel) -> dict[str, torch.Tensor]:
    """Full name -> this rank's local tensor (the parameter itself, no copy)."""
    local = model.state_dict(keep_vars=True)
    return {g: local[n] for n, g in _global_names(model).items()}


def _sources_for(cfg: QwenVLConfig, model_keys) -> dict[str, tuple[str, ...]]:
    """Model key -> the HF keys it is made of, for each of `model_keys` (one without any is an error)."""
    sources = hf_sources(cfg)
    for mk in model_keys:
        if mk not in sources:
            raise HFCheckpointError(f"model tensor {mk} has no HF source")
    return {mk: sources[mk] for mk in model_keys}


def _source_groups(cfg: QwenVLConfig, model_keys) -> list[tuple[tuple[str, ...], list[str]]]:
    """The model tensors grouped by the HF tensors they are made of (one HF tensor -> the adapter's q, k,
    v; w2 + w1 -> one linear_fc1): the unit a streaming conversion reads, maps and writes at once."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for mk, srcs in _sources_for(cfg, model_keys).items():
        groups.setdefault(srcs, []).append(mk)
    return list(groups.items())


class _Meter:
    """Progress of a long conversion: tensors and GB done, MB/s, at most one line every `every` seconds."""

    def __init__(self, progress: Callable | None, total_tensors: int, total_bytes: int, verb: str,
                 every: float = 5.0):
        self.progress, self.total, self.total_bytes, self.verb, self.every = progress, total_tensors, total_bytes, verb, every
        self.done = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def add(self, tensors: int, nbytes: int) -> None:
        self.done += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        if self.progress and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 2 ** 20
            self.progress(self.done, self.total, f"tensors, {self.bytes / 2 ** 30:.2f}/"
                          f"{self.total_bytes / 2 ** 30:.2f} GB {self.verb}, {rate:.0f} MB/s")


def _piece(mk: str, like: torch.Tensor, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of model tensor `mk`, shaped like `like`, cut from `full` (mapped HF tensors)."""
    piece = shard(full[mk], like, mk, tp_rank, tp)
    if piece.shape != like.shape:
        raise HFCheckpointError(f"{mk}: source shape {tuple(piece.shape)} does not fit "
                                f"{tuple(like.shape)} (tp rank {tp_rank}/{tp})")
    return piece


def _read_mapped(reader: HFCheckpointReader, srcs, cfg: QwenVLConfig) -> dict[str, torch.Tensor]:
    """The HF tensors `srcs` read and mapped to the model tensors they make (full form)."""
    return hf_to_model({k: reader.get(k) for k in srcs}, cfg, partial=True)


@torch.no_grad()
def load_hf_into_stage(model: QwenVLModel, reader: HFCheckpointReader, cfg: QwenVLConfig,
                       progress: Callable | None = None) -> None:
    """Copy this rank's share of an HF checkpoint into `model`, one HF tensor group at a time (in file
    order): each is read, mapped, sliced and copied into the parameter, then dropped."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dst_of = _stage_tensors(model)
    groups = _source_groups(cfg, dst_of)
    groups.sort(key=lambda g: (reader.weight_map.get(g[0][0], ""), g[0]))
    meter = _Meter(progress, len(dst_of), sum(t.nbytes for t in dst_of.values()), "filled")
    try:
        for srcs, mks in groups:
            full = _read_mapped(reader, srcs, cfg)
            for mk in mks:
                dst_of[mk].copy_(_piece(mk, dst_of[mk], full, tp_rank, tp))  # casts
                meter.add(1, dst_of[mk].nbytes)
            del full
    finally:
        reader.close()


class _HFSource:
    """The checkpoint writer's source for a converter's stage (see `save_model_weights`): the stage is
    allocated but never filled; a tensor the writer asks for (a stage tensor or a view of one, found by
    its address) is cut from this rank's piece of that stage tensor, made from the HF files when first
    asked for and dropped once all of it was written. A piece that is a slice of one HF tensor is a view
    of the file's mapping, so its bytes go from the input's page cache to the output's with no copy
    between; only tensors assembled from several (fc1, qkv, the padded vocabulary) or cast are made in
    memory."""

    def __init__(self, model: QwenVLModel, reader: HFCheckpointReader, cfg: QwenVLConfig,
                 progress: Callable | None = None):
        self.reader, self.cfg = reader, cfg
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dst_of = _stage_tensors(model)
        self.sources = _sources_for(cfg, self.dst_of)
        spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, mk) for mk, t in self.dst_of.items() if t.numel())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise RuntimeError(f"stage tensors {a} and {b} share memory")
        self.spans, self.starts = spans, [s for s, _, _ in spans]
        self.made: dict[str, _Piece] = {}  # model key -> its piece while parts of it are still to write
        # a tensor replicated over TP is written by TP rank 0 only: the other ranks' meters end short of 100%
        self.meter = _Meter(progress, len(self.dst_of), sum(t.nbytes for t in self.dst_of.values()), "written")
        self.lock = threading.Lock()

    def _stage_tensor_of(self, t: torch.Tensor) -> str:
        i = bisect.bisect_right(self.starts, t.data_ptr()) - 1
        if i >= 0:
            start, end, mk = self.spans[i]
            if t.data_ptr() + t.nbytes <= end and t.is_contiguous():
                return mk
        raise HFCheckpointError(f"the checkpoint writer asked for a tensor of shape {tuple(t.shape)} that is "
                                "no part of this stage's model tensors")

    @torch.no_grad()
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        mk = self._stage_tensor_of(t)
        dst = self.dst_of[mk]
        with self.lock:
            entry = self.made.setdefault(mk, _Piece(threading.Lock(), None, dst.numel()))
        with entry.lock:
            if entry.tensor is None:
                full = _read_mapped(self.reader, self.sources[mk], self.cfg)
                entry.tensor = _piece(mk, dst, full, self.tp_rank, self.tp).to(dst.dtype).contiguous()
            piece = entry.tensor
            entry.left -= t.numel()
            done = entry.left == 0
        if done:
            with self.lock:
                del self.made[mk]
                self.meter.add(1, dst.nbytes)
        offset = (t.data_ptr() - dst.data_ptr()) // dst.element_size()
        return piece.as_strided(t.shape, t.stride(), piece.storage_offset() + offset)


@dataclasses.dataclass
class _Piece:
    lock: threading.Lock
    tensor: torch.Tensor | None  # made on the first request
    left: int  # elements not yet handed to the writer


def hf_to_mcore(hf_dir: str, out_dir: str, dtype: str = "fp32", progress: Callable | None = None) -> str:
    """HF Qwen-VL directory -> Megatron checkpoint `out_dir` (iteration 0) in the current layout.

    The stage is allocated but never filled (its pages untouched): the save is planned from its shapes,
    and the writer takes each tensor's piece from the HF files as it reaches it (`_HFSource`), so a rank
    holds only the tensors being written."""
    from ..training.checkpoint import save_model_weights

    _, cfg = read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    model = build_stage(cfg, DTYPES[dtype], init=False)
    source = _HFSource(model, reader, cfg, progress if _rank0() else None)
    try:
        return save_model_weights([model], out_dir, cfg, iteration=0, source=source,
                                  args={"converted_from": os.path.abspath(hf_dir), "dtype": dtype})
    finally:
        reader.close()


def checkpoint_dtype(ckpt_dir: str) -> torch.dtype:
    """The dtype the model tensors of a dist-checkpoint were saved in."""
    from megatron.core import dist_checkpointing
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    for key, sh in meta.items():
        if "word_embeddings" in key or "linear_qkv.weight" in key:
            return sh.dtype
    return next(iter(meta.values())).dtype


def load_mcore_stage(load: str) -> tuple[QwenVLConfig, QwenVLModel]:
    """Build this rank's stage (uninitialised) with the checkpoint's config and dtype and load its weights."""
    from ..training.checkpoint import load_model_weights, read_model_config, resolve_checkpoint_dir

    cfg = read_model_config(load)
    model = build_stage(cfg, checkpoint_dtype(resolve_checkpoint_dir(load)), init=False)
    load_model_weights([model], load)
    return cfg, model


def _share(groups: list, size: Callable, n: int) -> list[list]:
    """`groups` dealt to `n` writers by bytes (`deal`); each writer's share keeps the groups' own order."""
    from ..training.checkpoint import deal
    return [[groups[i] for i in sorted(share)] for share in deal([size(srcs) for srcs, _ in groups], n)]


@torch.no_grad()
def mcore_to_hf(load: str, out_dir: str, dtype: str | None = None, tokenizer_file: str | None = None,
                max_shard_bytes: int = 5 * 2 ** 30, progress: Callable | None = None,
                code_repo: str = DEFAULT_CODE_REPO, generation: str | None = None) -> dict | None:
    """Megatron checkpoint -> HF directory (config.json with the release's fields and an `auto_map` into
    `code_repo`, generation_config.json, safetensors shards + index, tokenizer file and config).

    Nothing is loaded into a model: the tensor-parallel ranks of each pipeline stage (data-parallel
    replica 0) share its tensor groups by bytes (`_share`); each reads its groups one at a time in full
    form straight from the checkpoint files (any saved layout), maps them and streams them into its own
    shard files, whose headers are known in advance. Every file is first checked against the
    checkpoint's checksums. Returns the index on global rank 0."""
    from ..training.checkpoint import read_model_config, resolve_checkpoint_dir, verify_checksums
    from .dist_reader import DistCheckpointReader, layer_keys_map

    ckpt = resolve_checkpoint_dir(load)
    cfg = read_model_config(load)
    verify_checksums(ckpt)  # collective: the files are split over the ranks
    reader = DistCheckpointReader(ckpt)
    stage = build_stage(cfg, checkpoint_dtype(ckpt), init=False)  # names and layer renaming only
    names, keys_map = rank_model_keys(stage), layer_keys_map(stage)
    del stage
    out_dtype = DTYPES[dtype] if dtype else checkpoint_dtype(ckpt)
    if parallel_state.get_data_parallel_rank() == 0:
        tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        shapes = hf_key_shapes(cfg)
        size = lambda srcs: sum(spec_nbytes(shapes[hk][0], out_dtype) for hk in srcs)
        groups = _share(_source_groups(cfg, names), size, tp)[tp_rank]
        specs = [(hk, shapes[hk][0], out_dtype) for srcs, _ in groups for hk in srcs]
        part = parallel_state.get_pipeline_model_parallel_rank() * tp + tp_rank
        writer = HFShardWriter(out_dir, specs, part, max_shard_bytes)
        meter = _Meter(progress if _rank0() else None, len(specs),
                       sum(spec_nbytes(s, d) for _, s, d in specs), "written")
        for srcs, mks in groups:
            full = {}
            for mk in mks:
                t = reader.full(mk, keys_map)
                full[mk] = t[: cfg.llm.vocab_size] if mk in VOCAB_KEYS else t  # padded rows never leave
            hf = model_to_hf(full, cfg)
            del full
            for hk in srcs:
                t = hf.pop(hk).to(out_dtype)
                writer.add(hk, t)
                meter.add(1, t.nbytes)
            del hf
        writer.flush()
    if dist.is_initialized():
        dist.barrier()
    index = None
    if _rank0():
        index = finalize_hf_dir(out_dir, cfg, out_dtype, tokenizer_file, code_repo, generation)
        missing = sorted(set(hf_keys(cfg)) - set(index["weight_map"]))
        if missing:
            raise HFCheckpointError(f"export to {out_dir} lacks {len(missing)} keys, e.g. {missing[:5]}")
    if dist.is_initialized():
        dist.barrier()
    return index


# ------------------------------------------------------------------------------------------ import-init
def import_config(qwen7b_dir: str, config_path: str | None = None, image_size: int = 224) -> QwenVLConfig:
    """The Qwen-VL config of a stage-1 model: `config_path` (a Qwen-VL config.json) if given, else the
    Qwen-7B LLM fields with the release's visual section at `image_size` (224 in stage 1)."""
    if config_path:
        with open(config_path) as f:
            raw = json.load(f)
        if "visual" not in raw:
            raise HFCheckpointError(f"--config {config_path} has no 'visual' section")
        return QwenVLConfig.from_hf_config(raw)
    path = os.path.join(qwen7b_dir, "config.json")
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{path} not found: --qwen7b-dir must be a Qwen-7B HF directory")
    with open(path) as f:
        raw = json.load(f)
    visual = dict(qwen_vl_7b().to_hf_config()["visual"], image_size=image_size, output_dim=raw["hidden_size"])
    return QwenVLConfig.from_hf_config(dict(raw, visual=visual))


def _llm_expected(cfg: QwenVLConfig) -> dict:
    return {k: v for k, v in hf_key_shapes(cfg).items() if not k.startswith("transformer.visual.")}


def validate_import_inputs(qwen7b_dir: str, openclip_path: str, cfg: QwenVLConfig) -> None:
    """Every LLM key of Qwen-7B and every visual key of OpenCLIP present, known and of the right shape."""
    reader = HFCheckpointReader(qwen7b_dir)
    check_against_config(reader.shapes(), _llm_expected(cfg), qwen7b_dir, "the Qwen-VL config")
    clip, keys = read_openclip_visual(openclip_path)
    shapes = clip.shapes()
    check_openclip({k: shapes[k] for k in keys}, cfg, openclip_path)


@torch.no_grad()
def _load_all_but(model: QwenVLModel, full: dict[str, torch.Tensor], keep_prefix: str) -> None:
    """load_full_state_dict for every tensor except those under `keep_prefix` (left as initialised)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = model.state_dict(keep_vars=True)
    for name, gname in _global_names(model).items():
        if gname.startswith(keep_prefix):
            continue
        if gname not in full:
            raise HFCheckpointError(f"nothing to initialise {gname} from")
        local[name].copy_(_piece(gname, local[name], full, tp_rank, tp))


def import_init(qwen7b_dir: str, openclip_path: str, out_dir: str, cfg: QwenVLConfig, dtype: str = "fp32",
                progress: Callable | None = None) -> str:
    """Stage-1 initial checkpoint in the current layout (see the module docstring)."""
    from ..training.checkpoint import save_model_weights

    model = build_stage(cfg, DTYPES[dtype])
    names = rank_model_keys(model)
    sources = hf_sources(cfg)
    llm_need = [hk for mk in names if mk.startswith("language.") for hk in sources[mk]]
    full = hf_to_model(HFCheckpointReader(qwen7b_dir).load(llm_need, progress if _rank0() else None), cfg,
                       partial=True)
    if model.pre_process:
        clip, _ = read_openclip_visual(openclip_path)
        full.update(openclip_to_model(clip.load(imported_openclip_keys(cfg)), cfg))
    # The adapter keeps the model's own fresh initialisation (megatron initialises on the CPU from one
    # seed and then splits, so every TP layout starts from the same full adapter).
    _load_all_but(model, _cast(full, DTYPES[dtype]), keep_prefix="adapter.")
    return save_model_weights([model], out_dir, cfg, iteration=0,
                              args={"initialised_from": {"llm": os.path.abspath(qwen7b_dir),
                                                         "vit": os.path.abspath(openclip_path)},
                                    "dtype": dtype})
