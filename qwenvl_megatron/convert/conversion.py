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

import json
import os
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..models.config import QwenVLConfig, qwen_vl_7b
from ..models.parallel import ParallelPlan
from ..models.qwen_vl import QwenVLModel
from .hf_checkpoint import (DEFAULT_CODE_REPO, DTYPES, HFCheckpointError, HFCheckpointReader, HFShardWriter, check_against_config,
                            finalize_hf_dir, read_hf_config)
from .hf_layout import hf_key_shapes, hf_keys, hf_sources, hf_to_model, model_to_hf
from .openclip import check_openclip, imported_openclip_keys, openclip_to_model, read_openclip_visual
from .sharding import _global_names, gather_full_state_dict, load_full_state_dict, shard


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _writer_rank() -> bool:
    """One writer per pipeline stage: TP rank 0 of data-parallel replica 0."""
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def build_stage(cfg: QwenVLConfig, dtype: torch.dtype) -> QwenVLModel:
    """This rank's pipeline stage of the model under the current parallel state, in eval mode."""
    plan = ParallelPlan(tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
                        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
                        params_dtype=dtype, bf16=dtype == torch.bfloat16, impl="local")
    model = QwenVLModel(cfg, plan, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
    return model.eval()


def rank_model_keys(model: QwenVLModel) -> list[str]:
    """Full names (global layer numbers) of the tensors this rank holds pieces of."""
    return list(_global_names(model).values())


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}


def load_hf_into_stage(model: QwenVLModel, reader: HFCheckpointReader, cfg: QwenVLConfig,
                       progress: Callable | None = None) -> None:
    """Copy this rank's share of an HF checkpoint into `model`, reading only the tensors it needs."""
    sources = hf_sources(cfg)
    need = [hk for mk in rank_model_keys(model) for hk in sources[mk]]
    hf = reader.load(need, progress)
    full = hf_to_model(hf, cfg, partial=True)
    dtype = next(model.parameters()).dtype
    load_full_state_dict(model, _cast(full, dtype))


def hf_to_mcore(hf_dir: str, out_dir: str, dtype: str = "fp32", progress: Callable | None = None) -> str:
    """HF Qwen-VL directory -> Megatron checkpoint `out_dir` (iteration 0) in the current layout."""
    from ..training.checkpoint import save_model_weights

    _, cfg = read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    model = build_stage(cfg, DTYPES[dtype])
    load_hf_into_stage(model, reader, cfg, progress if _rank0() else None)
    return save_model_weights([model], out_dir, cfg, iteration=0,
                              args={"converted_from": os.path.abspath(hf_dir), "dtype": dtype})


def checkpoint_dtype(ckpt_dir: str) -> torch.dtype:
    """The dtype the model tensors of a dist-checkpoint were saved in."""
    from megatron.core import dist_checkpointing
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    for key, sh in meta.items():
        if "word_embeddings" in key or "linear_qkv.weight" in key:
            return sh.dtype
    return next(iter(meta.values())).dtype


def load_mcore_stage(load: str) -> tuple[QwenVLConfig, QwenVLModel]:
    """Build this rank's stage with the checkpoint's config and dtype and load its weights."""
    from ..training.checkpoint import load_model_weights, read_model_config, resolve_checkpoint_dir

    cfg = read_model_config(load)
    model = build_stage(cfg, checkpoint_dtype(resolve_checkpoint_dir(load)))
    load_model_weights([model], load)
    return cfg, model


def mcore_to_hf(load: str, out_dir: str, dtype: str | None = None, tokenizer_file: str | None = None,
                max_shard_bytes: int = 5 * 2 ** 30, progress: Callable | None = None,
                code_repo: str = DEFAULT_CODE_REPO, generation: str | None = None) -> dict | None:
    """Megatron checkpoint -> HF directory (config.json with the release's fields and an `auto_map` into
    `code_repo`, generation_config.json, safetensors shards + index, tokenizer file and config).
    Returns the index on global rank 0."""
    cfg, model = load_mcore_stage(load)
    out_dtype = DTYPES[dtype] if dtype else next(model.parameters()).dtype
    full = gather_full_state_dict(model, cfg.llm.vocab_size)  # collective over TP
    if _writer_rank():
        hf = _cast(model_to_hf(full, cfg), out_dtype)
        writer = HFShardWriter(out_dir, parallel_state.get_pipeline_model_parallel_rank(), max_shard_bytes)
        for n, (k, t) in enumerate(hf.items(), 1):
            writer.add(k, t)
        writer.flush()
        if progress and _rank0():
            progress(1, 1, f"stage tensors written ({len(hf)})")
    del full
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
        src = shard(full[gname], local[name], gname, tp_rank, tp)
        if src.shape != local[name].shape:
            raise HFCheckpointError(f"{gname}: source shape {tuple(src.shape)} does not fit "
                                    f"{tuple(local[name].shape)}")
        local[name].copy_(src)


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
