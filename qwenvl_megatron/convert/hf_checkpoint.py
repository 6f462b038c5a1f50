"""Reading and writing HF checkpoint directories (config.json + weight shards), one shard at a time.

Reads `model.safetensors.index.json` + safetensors shards, `pytorch_model.bin.index.json` +
`pytorch_model-*.bin` shards, or a single `model.safetensors` / `pytorch_model.bin`. A reader only maps
key -> shard file up front; tensors are read when asked for, grouped by shard, so a rank of a parallel
conversion holds only its own share of a 9.6B-parameter model. Writes safetensors shards + index.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterable

import torch

from ..models.config import QwenVLConfig
from .hf_layout import UnknownKeyError, hf_key_shapes

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFE_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFCheckpointError(ValueError):
    """An HF directory is incomplete or does not fit its config; the message names the file / key."""


def progress_printer(prefix: str) -> Callable[[int, int, str], None]:
    """A progress callback printing `prefix [done/total] what (elapsed)` lines to stderr."""
    start = time.time()

    def show(done: int, total: int, what: str) -> None:
        width = 30
        bar = "#" * (width * done // max(total, 1))
        print(f"{prefix} [{bar:<{width}}] {done}/{total} {what} ({time.time() - start:.1f}s)",
              file=sys.stderr, flush=True)

    return show


def read_hf_config(hf_dir: str) -> tuple[dict, QwenVLConfig]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{path} not found: an HF checkpoint directory needs its config.json")
    with open(path) as f:
        raw = json.load(f)
    if "visual" not in raw:
        raise HFCheckpointError(f"{path} has no 'visual' section: not a Qwen-VL config (a Qwen-7B LLM "
                                f"directory is imported with `import-init`)")
    try:
        return raw, QwenVLConfig.from_hf_config(raw)
    except (KeyError, ValueError) as e:
        raise HFCheckpointError(f"{path}: {type(e).__name__}: {e}") from None


class HFCheckpointReader:
    """Lazy view of the tensors of an HF directory (or of one weights file)."""

    def __init__(self, path: str):
        self.path = path
        self._open = None  # (file, state dict) of the .bin file read last
        self._lock = threading.Lock()
        self.weight_map = self._weight_map(path)
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(f)})
        if missing:
            raise HFCheckpointError(f"shard file {missing[0]} named by the index of {path} does not exist"
                                    + (f" ({len(missing)} shard files missing)" if len(missing) > 1 else ""))

    @staticmethod
    def _weight_map(path: str) -> dict[str, str]:
        if os.path.isfile(path):  # a single weights file
            return {k: path for k in _file_keys(path)}
        for index in (SAFE_INDEX, BIN_INDEX):
            ipath = os.path.join(path, index)
            if os.path.isfile(ipath):
                with open(ipath) as f:
                    try:
                        wm = json.load(f)["weight_map"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise HFCheckpointError(f"{ipath}: not an HF index file ({e})") from None
                return {k: os.path.join(path, v) for k, v in wm.items()}
        for single in (SAFE_SINGLE, BIN_SINGLE):
            spath = os.path.join(path, single)
            if os.path.isfile(spath):
                return {k: spath for k in _file_keys(spath)}
        raise HFCheckpointError(f"no weights in {path}: expected {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE} "
                                f"or {BIN_SINGLE}")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key's shape, from safetensors headers (no tensor data is read) or lazily mapped .bin files."""
        out: dict[str, tuple[int, ...]] = {}
        for shard, keys in _by_shard(self.weight_map, self.weight_map).items():
            if shard.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(shard, framework="pt") as f:
                    out.update({k: tuple(f.get_slice(k).get_shape()) for k in keys})
            else:
                sd = _load_bin(shard)
                out.update({k: tuple(sd[k].shape) for k in keys})
        return out

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read on its own. safetensors maps the file and hands out tensors over the mapping:
        the file is opened per tensor, so the pages read stay resident only while the tensor lives (a
        handle kept open would keep every page it read). A .bin file stays open (mmapped) until the next
        file is read or `close`."""
        if key not in self.weight_map:
            raise HFCheckpointError(f"{key} is not in {self.path}")
        path = self.weight_map[key]
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                try:
                    return f.get_tensor(key)
                except Exception:  # noqa: BLE001 - safetensors' own error type for a missing key
                    raise HFCheckpointError(f"{path} does not hold {key}, although the index says so") from None
        with self._lock:  # the checkpoint writer's threads read through one reader
            if self._open is None or self._open[0] != path:
                self._open = (path, _load_bin(path))
            opened = self._open[1]
        if key not in opened:
            raise HFCheckpointError(f"{path} does not hold {key}, although the index says so")
        return opened[key]

    def close(self) -> None:
        self._open = None

    def load(self, keys: Iterable[str], progress: Callable | None = None) -> dict[str, torch.Tensor]:
        """The tensors under `keys`, read shard by shard (only the shards that hold them)."""
        keys = list(dict.fromkeys(keys))
        absent = [k for k in keys if k not in self.weight_map]
        if absent:
            raise HFCheckpointError(f"{len(absent)} keys not in {self.path}, e.g. {absent[:5]}")
        out: dict[str, torch.Tensor] = {}
        groups = _by_shard(keys, self.weight_map)
        for n, (shard, shard_keys) in enumerate(groups.items(), 1):
            for k in shard_keys:
                t = self.get(k)
                out[k] = t if shard.endswith(".safetensors") else t.clone()  # let the mmap go
            self.close()
            if progress:
                progress(n, len(groups), f"{os.path.basename(shard)} ({len(shard_keys)} tensors)")
        return out


def _by_shard(keys: Iterable[str], weight_map: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(weight_map[k], []).append(k)
    return dict(sorted(groups.items()))


def _load_bin(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file
        raise HFCheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _file_keys(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    sd = _load_bin(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        raise HFCheckpointError(f"{path} nests its tensors under 'state_dict' (a training checkpoint); save "
                                f"the plain state dict (without any 'module.' prefix) to a file first")
    return list(sd)


def check_against_config(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[tuple[int, ...], str]],
                         where: str, config_path: str, require_all: bool = True) -> None:
    """Unknown keys, missing keys and shapes that contradict the config are errors naming the key."""
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise UnknownKeyError(f"{where}: {len(unknown)} keys are not part of the model described by "
                              f"{config_path}: {unknown[:5]}")
    missing = sorted(set(expected) - set(shapes)) if require_all else []
    if missing:
        raise HFCheckpointError(f"{where}: {len(missing)} keys of the model described by {config_path} are "
                                f"missing: {missing[:5]}")
    for key, shape in shapes.items():
        want, fields = expected[key]
        if tuple(shape) != tuple(want):
            raise HFCheckpointError(f"{where}: {key} has shape {tuple(shape)} but {config_path} ({fields}) "
                                    f"implies {tuple(want)}")


def validate_hf_dir(hf_dir: str) -> tuple[QwenVLConfig, HFCheckpointReader]:
    """Config, shard files, key set and every shape, checked before a conversion starts."""
    _, cfg = read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    check_against_config(reader.shapes(), hf_key_shapes(cfg), hf_dir, os.path.join(hf_dir, "config.json"))
    return cfg, reader


# ------------------------------------------------------------------------------------------------ write
_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32"}


def spec_nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype`."""
    return math.prod(shape) * dtype.itemsize


class HFShardWriter:
    """Streams tensors into size-limited safetensors shards: the tensors' keys, shapes and dtypes are
    known up front (`specs`, in the order they will be added), so each file's header is written first
    and every tensor goes to disk as it is added; nothing is buffered. `finalize_hf_dir` names the parts
    model-0000i-of-0000n and writes the index. Several writers (one per pipeline stage) can share a
    directory: each uses its own `part` tag."""

    def __init__(self, out_dir: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], part: int = 0,
                 max_shard_bytes: int = 5 * 2 ** 30):
        self.out_dir, self.part = out_dir, part
        self._files: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        size = 0
        for key, shape, dtype in specs:
            n = spec_nbytes(shape, dtype)
            if not self._files or (size + n > max_shard_bytes and self._files[-1]):
                self._files.append([])
                size = 0
            self._files[-1].append((key, tuple(shape), dtype))
            size += n
        self._queue = [spec for f in self._files for spec in f]
        self._next = 0
        self._file = None
        self._file_index = -1
        self._left_in_file = 0
        self.bytes_written = 0
        os.makedirs(out_dir, exist_ok=True)

    def _open_next(self) -> None:
        self._close_file()
        self._file_index += 1
        specs = self._files[self._file_index]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in specs:
            n = spec_nbytes(shape, dtype)
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        name = f".part{self.part:03d}-{self._file_index:05d}.safetensors"
        self._file = open(os.path.join(self.out_dir, name), "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._left_in_file = len(specs)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise HFCheckpointError(f"{key} was not announced to the writer of {self.out_dir}")
        want, shape, dtype = self._queue[self._next]
        if (key, tuple(tensor.shape), tensor.dtype) != (want, shape, dtype):
            raise HFCheckpointError(f"writer of {self.out_dir} expected {want} {shape} {dtype}, got {key} "
                                    f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._left_in_file == 0:
            self._open_next()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self.bytes_written += data.numel()
        self._left_in_file -= 1
        self._next += 1

    def flush(self) -> None:
        """Close the last file; every announced tensor must have been added."""
        if self._next != len(self._queue):
            raise HFCheckpointError(f"writer of {self.out_dir}: {len(self._queue) - self._next} announced tensors "
                                    f"were never added, e.g. {self._queue[self._next][0]}")
        self._close_file()


# ------------------------------------------------------------------------------ what makes an export load
DEFAULT_CODE_REPO = "Qwen/Qwen-VL"
QWEN_VOCAB_NAME = "qwen.tiktoken"  # the file name the remote QWenTokenizer opens
QWEN_EOD_ID = 151643
# generation_config.json of the releases (reference 1.6); eos/pad follow the tokenizer when it is not Qwen's.
GENERATION_CONFIGS = {
    "base": {"chat_format": "raw", "do_sample": True, "eos_token_id": QWEN_EOD_ID, "max_new_tokens": 512,
             "max_window_size": 6144, "pad_token_id": QWEN_EOD_ID, "top_k": 0, "top_p": 0.5},
    "chat": {"chat_format": "chatml", "do_sample": True, "eos_token_id": QWEN_EOD_ID, "max_new_tokens": 512,
             "max_window_size": 6144, "pad_token_id": QWEN_EOD_ID, "top_k": 0, "top_p": 0.3},
}


def generation_kind(code_repo: str) -> str:
    """`chat` for a chat release's code (Qwen/Qwen-VL-Chat), else `base`."""
    return "chat" if code_repo.rstrip("/").lower().endswith("-chat") else "base"


def remote_ref(code_repo: str, ref: str) -> str:
    """`Qwen/Qwen-VL--modeling_qwen.QWenLMHeadModel`: transformers loads the class from that Hub repository."""
    if code_repo.count("/") != 1 or not all(code_repo.split("/")):
        raise HFCheckpointError(f"--code-repo {code_repo!r} is not a Hub repository name like Qwen/Qwen-VL")
    return f"{code_repo}--{ref}"


def export_config(cfg: QwenVLConfig, dtype: torch.dtype | None = None,
                  code_repo: str = DEFAULT_CODE_REPO) -> dict:
    """config.json of an export: the model's fields, the release's other fields, `torch_dtype` and an
    `auto_map` naming the official remote code (no code is copied)."""
    config = cfg.to_hf_config()
    if dtype is not None:
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
    config["auto_map"] = {"AutoConfig": remote_ref(code_repo, "configuration_qwen.QWenConfig"),
                          "AutoModelForCausalLM": remote_ref(code_repo, "modeling_qwen.QWenLMHeadModel")}
    return config


def official_code_differences(cfg: QwenVLConfig) -> list[str]:
    """What the official remote code would build differently from this model. It reads only the release's
    config.json fields (tests/hf_remote checks that it then gives our logits): it derives the adapter heads
    as output_dim // 128, has a 16x16 ViT position table, drops kv_proj when the ViT width equals output_dim,
    uses LayerNorm eps 1e-6 in the visual part, and its tokenizer always writes 256 image positions."""
    v, a, h = cfg.vit, cfg.adapter, cfg.llm.hidden_size
    out = []
    if a.num_heads != h // 128:
        out.append(f"adapter heads {a.num_heads} (it builds output_dim // 128 = {h // 128})")
    if v.pos_grid != 16:
        out.append(f"ViT position grid {v.pos_grid}x{v.pos_grid} (it has 16x16)")
    if v.width == h:
        out.append(f"ViT width = output_dim = {h} (it then has no kv_proj)")
    if (v.norm_eps, a.norm_eps) != (1e-6, 1e-6):
        out.append(f"visual LayerNorm eps {v.norm_eps}/{a.norm_eps} (it uses 1e-6)")
    if a.num_queries != 256:
        out.append(f"{a.num_queries} image queries (its tokenizer writes 256 image positions)")
    return out


def tokenizer_config(cfg: QwenVLConfig, code_repo: str = DEFAULT_CODE_REPO) -> dict:
    return {"model_max_length": cfg.llm.max_position_embeddings, "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": [remote_ref(code_repo, "tokenization_qwen.QWenTokenizer"), None]}}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_export_metadata(out_dir: str, cfg: QwenVLConfig, dtype: torch.dtype | None = None,
                          tokenizer_file: str | None = None, code_repo: str = DEFAULT_CODE_REPO,
                          generation: str | None = None) -> None:
    """config.json, generation_config.json and, with a tokenizer file, the file itself: a Qwen vocabulary
    (`*.tiktoken`) is written as qwen.tiktoken next to tokenizer_config.json (the remote QWenTokenizer reads
    both); any other file is copied as is, and for a SentencePiece model (`*.model`) generation_config.json
    takes its end-of-text id. `generation` is `base` or `chat` (default: from `code_repo`)."""
    kind = generation or generation_kind(code_repo)
    if kind not in GENERATION_CONFIGS:
        raise HFCheckpointError(f"generation config {kind!r} unknown; choose one of {sorted(GENERATION_CONFIGS)}")
    gen = dict(GENERATION_CONFIGS[kind])
    _write_json(os.path.join(out_dir, "config.json"), export_config(cfg, dtype, code_repo))
    differences = official_code_differences(cfg)
    if differences:  # transformers would build a different network without an error for some of these
        print(f"note: {out_dir}: the remote code of {code_repo} cannot run this model as it is: "
              f"{'; '.join(differences)}", file=sys.stderr)
    if tokenizer_file:
        if not os.path.isfile(tokenizer_file):
            raise HFCheckpointError(f"--tokenizer-file {tokenizer_file} does not exist")
        if tokenizer_file.endswith(".tiktoken"):
            shutil.copy(tokenizer_file, os.path.join(out_dir, QWEN_VOCAB_NAME))
            _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(cfg, code_repo))
        else:
            shutil.copy(tokenizer_file, os.path.join(out_dir, os.path.basename(tokenizer_file)))
            if tokenizer_file.endswith(".model"):
                from ..data.tokenizer import build_tokenizer
                eod = build_tokenizer("sentencepiece", tokenizer_file).eod_id
                gen.update(eos_token_id=eod, pad_token_id=eod)
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)


def finalize_hf_dir(out_dir: str, cfg: QwenVLConfig, dtype: torch.dtype | None = None,
                    tokenizer_file: str | None = None, code_repo: str = DEFAULT_CODE_REPO,
                    generation: str | None = None) -> dict:
    """Rename the parts written by HFShardWriters to model-0000i-of-0000n.safetensors, write the index and
    the export's metadata (`write_export_metadata`). Returns the index."""
    from safetensors import safe_open
    parts = sorted(f for f in os.listdir(out_dir) if f.startswith(".part") and f.endswith(".safetensors"))
    if not parts:
        raise HFCheckpointError(f"nothing was written into {out_dir}")
    for f in os.listdir(out_dir):  # an earlier export in the same place
        if f.startswith("model-") and f.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, f))
    weight_map, total = {}, 0
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(out_dir, part), os.path.join(out_dir, name))
        with safe_open(os.path.join(out_dir, name), framework="pt") as f:
            for k in f.keys():
                if k in weight_map:
                    raise HFCheckpointError(f"{k} was written twice (in {weight_map[k]} and {name})")
                weight_map[k] = name
                sl = f.get_slice(k)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * torch.empty((), dtype=_st_dtype(sl.get_dtype())).element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    mode = os.stat(os.path.join(out_dir, SAFE_INDEX)).st_mode & 0o777  # what the umask gives a new file
    for name in set(weight_map.values()):  # safetensors writes its files owner-only (0600)
        os.chmod(os.path.join(out_dir, name), mode)
    write_export_metadata(out_dir, cfg, dtype, tokenizer_file, code_repo, generation)
    return index


def _st_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32}[name]


def save_hf_dir(out_dir: str, hf_state: dict[str, torch.Tensor], cfg: QwenVLConfig,
                max_shard_bytes: int = 5 * 2 ** 30, tokenizer_file: str | None = None,
                code_repo: str = DEFAULT_CODE_REPO) -> dict:
    """A whole HF state dict -> an HF directory (single process helper, used by tests and small models)."""
    writer = HFShardWriter(out_dir, [(k, tuple(t.shape), t.dtype) for k, t in hf_state.items()], 0, max_shard_bytes)
    for k, t in hf_state.items():
        writer.add(k, t)
    writer.flush()
    dtypes = {t.dtype for t in hf_state.values()}
    return finalize_hf_dir(out_dir, cfg, dtypes.pop() if len(dtypes) == 1 else None, tokenizer_file, code_repo)
