"""Checkpoints on megatron-core dist-checkpointing (torch_dist), reshardable over TP / PP / DP.

Layout under a save directory::

    <dir>/latest_checkpointed_iteration.txt   the newest complete iteration, written LAST
    <dir>/iter_0000500/                       one dist-checkpoint directory
        metadata.json, common.pt, __*.distcp  megatron's files; sharded tensors keyed by model names
        model_config.json                     cfg.to_hf_config(): what network the weights belong to

The dist-checkpoint holds `model` (each tensor keyed by its global name, so any TP/PP layout can load it),
and for full saves also `optimizer` (reshardable form), `opt_param_scheduler`, `rng_state` (one object
per rank), `consumed_samples`, `iteration` and `args`. Weights-only saves (converter output, stage
hand-over) hold `model`, `iteration` and `args` only.

Transformer Engine and local layers write one format. TE modules carry `_extra_state` (FP8 scaling
metadata; megatron stores it as a ShardedObject) that local modules lack or keep empty, so loads accept
a checkpoint without it (TE keeps its fresh, empty state) and ignore it on a local model; every other
missing or unexpected key is a `CheckpointError` naming the checkpoint and the keys. A checkpoint saved
for a different network (its `model_config.json` differs in anything but `vit.image_size`, which stages
1 and 2 change) is refused before any tensor is read.

A save is atomic and durable: every rank writes into `iter_XXXXXXX.tmp`, rank 0 fsyncs its files,
renames it into place once all ranks have finished, fsyncs the save directory, and only then moves the
marker (written, fsynced, renamed, directory fsynced). A crash mid-save leaves the previous checkpoint
current; the next successful save removes the `iter_*.tmp` it left. The trainer saves with
`move_marker=False` and calls `mark_proven` once a finite loss on the weights proves them. A failed save
raises `CheckpointSaveError` on every rank: one line with the errno, the path and the free space.

Every file of a checkpoint has its size and CRC-32 in `checksums.json` (each rank's shards hashed as they
are written, rank 0 hashes the rest, before the rename); loads verify them first (`verify_checksums=False`
skips it) and refuse a damaged file by name. Saves write in this process (megatron's torch_dist format
through `_InProcessSaveStrategy`): no writer process, no spawn manager, no resource tracker, so a SIGTERM
sent to the whole process group (torchrun, Slurm) reaches only the trainer, whose save goes on.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import heapq
import inspect
import itertools
import json
import os
import queue
import re
import resource
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from ..models.config import QwenVLConfig
from .step import unwrap

MARKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.json"
CHECKSUMS = "checksums.json"  # {"algorithm": "crc32", "files": {name: {"size": n, "crc32": "8 hex"}}}
FORMAT_VERSION = 1
# Reshardable over TP, PP and DP (megatron's default for the distributed optimizer is DP-only).
_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
EXTRA_STATE = "_extra_state"  # TE's per-module FP8 metadata: optional in either direction
_NOT_MODEL = ("optimizer.", "rng_state")  # checkpoint keys that are not model weights
# Config fields a checkpoint may differ in: the resolution (stage 1 trains at 224, stage 2 at 448; the
# learned position table is pos_grid x pos_grid, resized to the patch grid, so no weight depends on it).
RESOLUTION_FIELDS = ("vit.image_size",)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the path."""


def iter_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> int | None:
    """The iteration named by the marker file, or None when `save_dir` has no complete checkpoint."""
    path = os.path.join(save_dir, MARKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """A save directory (-> its latest or the given iteration) or an `iter_*` directory -> the iter dir."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            raise CheckpointError(f"no checkpoint in {path}: neither {MARKER} nor a dist-checkpoint "
                                  f"(metadata.json) is there")
    target = iter_dir(path, iteration)
    if not os.path.isfile(os.path.join(target, "metadata.json")):
        raise CheckpointError(f"checkpoint directory {target} is missing or incomplete (no metadata.json)")
    return target


def config_differences(saved: QwenVLConfig, running: QwenVLConfig) -> list[str]:
    """'part.field saved != running' for each field in which two configs describe different networks."""
    def flat(cfg):
        out = {f"{part}.{k}": v for part in ("llm", "vit", "adapter") for k, v in asdict(getattr(cfg, part)).items()}
        return {**out, "image_start_id": cfg.image_start_id}
    a, b = flat(saved), flat(running)
    return [f"{k} {a[k]} != {b[k]}" for k in a if k not in RESOLUTION_FIELDS and a[k] != b[k]]


def check_model_config(ckpt: str, cfg: QwenVLConfig) -> None:
    """Refuse a checkpoint saved for another network in one line, before megatron reads any tensor.
    (Checkpoints without model_config.json, which this module never writes, are not checked.)"""
    if not os.path.isfile(os.path.join(ckpt, MODEL_CONFIG)):
        return
    diff = config_differences(read_model_config(ckpt), cfg)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} was saved for a different model: {', '.join(diff)} "
                              f"(checkpoint != running model)")


def read_model_config(path: str) -> QwenVLConfig:
    """The QwenVLConfig a checkpoint was saved with (`path`: save dir or iter dir)."""
    cfg_path = os.path.join(resolve_checkpoint_dir(path), MODEL_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path} not found: the checkpoint does not say which model it holds")
    with open(cfg_path) as f:
        return QwenVLConfig.from_hf_config(json.load(f))


# ------------------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict:
    return {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel": parallel_state.get_data_parallel_world_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def _model_state(model_chunks: list) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    return unwrap(model_chunks[0]).sharded_state_dict()


def _rng_object() -> ShardedObject:
    """This rank's RNG streams: one object per (pp, tp, dp) position, so it only reloads on the same layout."""
    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizer_has_state(optimizer, scheduler) -> bool:
    """Before the first update there is no optimizer state to save (and megatron cannot reload an empty
    one). The scheduler's step count is the same on every rank, so all ranks decide alike."""
    if scheduler is not None:
        return scheduler.num_steps > 0
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(getattr(o, "optimizer", o).state) for o in opts)


def _plain(args: Any) -> Any:
    """Arguments as plain JSON-able values (namespaces, dataclasses, dtypes) for the common state."""
    if args is None:
        return {}
    if is_dataclass(args):
        args = asdict(args)
    elif hasattr(args, "__dict__") and not isinstance(args, dict):
        args = vars(args)
    return json.loads(json.dumps(args, default=str))


# ---------------------------------------------------------------------------------------------- save
class CheckpointSaveError(CheckpointError):
    """A save failed; the message carries the errno, the path and the free space there, in one line."""


def _free_space(path: str) -> str:
    path = os.path.dirname(path.rstrip(os.sep)) if path.endswith((".tmp", MARKER)) else path
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path or ".")
    except OSError as e:
        return f"free space on {path} unknown ({e.strerror})"
    return f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB on {path}"


def _error_chain(exc: BaseException) -> list[BaseException]:
    """An exception and everything below it: causes, contexts, and the per-rank failures that
    torch.distributed.checkpoint's CheckpointException keeps as (exception, traceback) pairs."""
    seen, todo, out = set(), [exc], []
    while todo:
        e = todo.pop(0)
        if isinstance(e, tuple) and e and isinstance(e[0], BaseException):
            e = e[0]
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__, *(getattr(e, "failures", None) or {}).values()]
    return out


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^\n'\"]+)")


def _probable_errno(path: str) -> tuple[int | None, str | None]:
    """When the writer lost the errno: a file-size limit, a full disk or an unwritable directory, if so."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG, f"File too large (probably: the file-size limit, ulimit -f, is {soft} bytes)"
    directory = os.path.dirname(path.rstrip(os.sep)) or "."
    try:
        if shutil.disk_usage(directory).free < 2**30:
            return errno.ENOSPC, "No space left on device (probably: under 1 GiB free)"
    except OSError:
        pass
    if os.path.isdir(directory) and not os.access(directory, os.W_OK):
        return errno.EACCES, "Permission denied (probably: the directory is not writable)"
    return None, None


def describe_save_error(exc: BaseException, path: str, what: str) -> str:
    """One line: what failed, the errno (number, name, text), the file, the free space there, and the
    deepest error of the chain (megatron and torch re-wrap the writer's errors: a file-size limit surfaces
    as 'unexpected pos ...' or a CheckpointException with the EFBIG below it)."""
    chain = _error_chain(exc)
    os_err = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    if os_err is not None:
        number, text, where = os_err.errno, os_err.strerror, os_err.filename or path
    else:  # only the text survived (e.g. a worker process's error re-raised as a RuntimeError)
        found = next((m for m in (_ERRNO_TEXT.search(str(e)) for e in chain) if m), None)
        number, text, where = (int(found.group(1)), found.group(2).strip(), path) if found else (None, None, path)
    if not number:  # torch's C++ writer drops errno ("unexpected pos 704 vs 598"): name the likely one
        number, text = _probable_errno(path)
    code = f"[Errno {number} {errno.errorcode.get(number, '?')}] {text}" if number else "errno unknown"
    root = chain[-1]
    cause = " ".join(f"{type(root).__name__}: {root}".split())
    return f"{what} failed: {code}: {where}; {_free_space(path)} ({cause[:300]})"


def _agree_ok(error: BaseException | None, path: str, what: str) -> None:
    """Collective: raise CheckpointSaveError on every rank if any rank failed (none waits in a barrier)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = flag.item() > 0
    else:
        failed = error is not None
    if error is not None:
        raise CheckpointSaveError(describe_save_error(error, path, what)) from error
    if failed:
        raise CheckpointSaveError(f"{what} failed on another rank (see its error): {path}; {_free_space(path)}")


def _device():
    from ..runtime import device
    return device()


def _fsync(path: str) -> None:
    """fsync a file or a directory (a directory fsync makes its entries, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def _write_marker(save_dir: str, iteration: int) -> None:
    """Replace the marker atomically and durably: write + fsync a temp file, rename, fsync the directory."""
    marker_tmp = os.path.join(save_dir, MARKER + ".tmp")
    with open(marker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker_tmp, os.path.join(save_dir, MARKER))
    _fsync(save_dir)


def _remove_stale_temps(save_dir: str) -> list[str]:
    """`iter_*.tmp` directories left by failed or killed saves (called after a successful one)."""
    stale = sorted(glob.glob(os.path.join(glob.escape(save_dir), "iter_*.tmp")))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ---------------------------------------------------------------------- in-process writer, checksums
class _InProcessSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save (same files, same format) with the shard files written by threads of
    this process. megatron's FileSystemWriterAsync forks one writer process per file and collects their
    results through a spawn-context `multiprocessing.Manager` (a server process plus the resource tracker,
    started at the first save of a process: 4-20 s of re-importing the trainer). Those helpers share the
    trainer's process group, so a group-wide SIGTERM (torchrun's, Slurm's) killed them mid-save
    (BrokenPipeError); a forked writer inherited the trainer's SIGTERM handler; a SIGKILLed rank left them
    behind. Here none of them exists."""

    source = None  # see save_model_weights: the data of each tensor, made when the writer reaches it

    def async_save(self, sharded_state_dict, checkpoint_dir):
        # prepare_write_data asks filesystem_async for the Manager's queue; hand it a placeholder instead
        # (replaced by a thread queue in _get_save_and_finalize_callbacks), so no Manager is started.
        # With a source, nothing is resolved before the write (megatron copies views while resolving: that
        # copy would read the stage's unfilled memory).
        before = filesystem_async._results_queue, filesystem_async.FileSystemWriterAsync.prepare_write_data
        filesystem_async._results_queue = _NO_MANAGER
        if self.source is not None:
            filesystem_async.FileSystemWriterAsync.prepare_write_data = _defer_prepare
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            filesystem_async._results_queue, filesystem_async.FileSystemWriterAsync.prepare_write_data = before

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        if self.source is not None:
            return request._replace(async_fn=partial(_prepare_and_write, writer, self.source), async_fn_args=[])
        if request.async_fn is None:  # nothing to write on this rank
            return request
        writer.results_queue = queue.SimpleQueue()  # read back by writer.retrieve_write_results
        rank, buckets, _ = request.async_fn_args
        transforms = [writer.transforms] if hasattr(writer, "transforms") else []
        return request._replace(async_fn=partial(_write_buckets, transforms),
                                async_fn_args=[rank, buckets, writer.results_queue])


_NO_MANAGER = object()


def _defer_prepare(writer, plan, planner) -> None:
    """FileSystemWriterAsync.prepare_write_data for a save from a source: nothing resolved yet."""
    writer._deferred = (plan, planner)
    writer.write_buckets, writer.results_queue = [], None


class _CopiedWhenWritten:
    """A bucket's tensors, each taken when the writer reaches it: from `source` (the data for the
    resolved tensor) if given, else the tensor itself. torch.save writes a tensor's whole storage, so
    megatron copies views; a contiguous view is instead aliased by a tensor whose storage is exactly its
    bytes (same file, no copy); only a non-contiguous one is copied, one at a time."""

    def __init__(self, items: list, source=None):
        self.items, self.source = items, source

    def __iter__(self):
        for item, t in self.items:
            data = t.detach()
            if self.source is not None:
                data = self.source(data)
                if data.shape != t.shape or data.dtype != t.dtype:
                    raise ValueError(f"checkpoint source gave {data.dtype} {tuple(data.shape)} for "
                                     f"{item.index.fqn}, which is {t.dtype} {tuple(t.shape)}")
            yield item, _exact_storage(data)

    def __len__(self) -> int:
        return len(self.items)


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a tensor with the same values whose storage holds exactly them (what torch.save writes).
    The alias borrows `t`'s memory: `t` must outlive it (the bucket keeps it)."""
    if t.device.type != "cpu":  # never alias a device address from the host: copy it over (exact storage)
        return t.to("cpu")
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().nbytes() == nbytes:
        return t
    if nbytes == 0 or not t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    raw = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    return torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype).view(t.shape)


def deal(sizes: list[int], bins: int) -> list[list[int]]:
    """The indices of `sizes` dealt to `bins`: largest first, each to the bin with the fewest bytes so far
    (ties: the lower bin), so every rank that deals the same sizes gets the same bins."""
    load, out = [(0, b) for b in range(bins)], [[] for _ in range(bins)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        total, b = heapq.heappop(load)
        out[b].append(i)
        heapq.heappush(load, (total + sizes[i], b))
    return out


def _prepare_and_write(writer, source) -> None:
    """megatron's prepare_write_data for a save from `source`, then the write: one file per writer thread,
    each tensor's data taken only when the writer reaches it (`_CopiedWhenWritten`). The pieces of one
    tensor (megatron writes the [gate; up] halves of fc1 as two) go to one thread, one after the other,
    so a source that makes a tensor once holds it only while its pieces are written."""
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
    from torch.distributed.checkpoint.planner import WriteItemType
    plan, planner = writer._deferred
    bins = max(1, writer.thread_count)
    buckets = [([], []) for _ in range(bins)]
    tensors: dict[int, list] = {}
    for n, item in enumerate(plan.items):
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            buckets[n % bins][0].append((item, data))
        else:
            tensors.setdefault(data.untyped_storage().data_ptr(), []).append((item, data))
    groups = list(tensors.values())
    for b, share in enumerate(deal([sum(t.nbytes for _, t in g) for g in groups], bins)):
        for i in share:
            buckets[b][1].extend(groups[i])
    writer.write_buckets = []
    for bytes_data, tensor_data in buckets:
        if bytes_data or tensor_data:
            name = f"{plan.storage_data.prefix}{len(writer.write_buckets)}{DEFAULT_SUFFIX}"
            writer.write_buckets.append((os.path.join(writer.checkpoint_dir, name), name,
                                         (bytes_data, _CopiedWhenWritten(tensor_data, source))))
    writer.results_queue = None
    if writer.write_buckets:
        writer.results_queue = queue.SimpleQueue()
        transforms = [writer.transforms] if hasattr(writer, "transforms") else []
        _write_buckets(transforms, _rank(), writer.write_buckets, writer.results_queue)
        writer.write_buckets = [(path, name, ([], [])) for path, name, _ in writer.write_buckets]


def _write_buckets(transforms: list, rank: int, buckets: list, results_queue) -> None:
    """What megatron's write_preloaded_data_multiproc does, with threads instead of forked processes:
    each bucket (one file) written item by item as megatron's write_preloaded_data writes it, then
    fsynced; the results, or the first error, go to `results_queue`."""
    with ThreadPoolExecutor(max_workers=max(1, len(buckets)), thread_name_prefix="ckpt-writer") as pool:
        futures = [pool.submit(_write_bucket, transforms, bucket) for bucket in buckets]
        try:
            results_queue.put({i: f.result() for i, f in enumerate(futures)})
        except Exception as e:  # noqa: BLE001 - megatron's retrieve_write_results re-raises it
            results_queue.put(e)


class _Checksummed:
    """A file that keeps the CRC-32 and size of what is written through it, so checksums.json needs no
    second pass over the written shards."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, b) -> int:
        n = self.f.write(b)
        view = memoryview(b)
        self.crc = zlib.crc32(view if view.contiguous else view.tobytes(), self.crc)
        self.size += view.nbytes
        return n

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()


_WRITTEN: dict[str, dict] = {}  # shard path -> {"size", "crc32"} recorded by _write_bucket, taken by _save


def _write_bucket(transforms: list, bucket) -> list:
    """One shard file: its byte items, then its tensors (torch.save records), as megatron writes them."""
    from torch.distributed.checkpoint.filesystem import _write_item
    path, storage_key, (bytes_data, tensor_data) = bucket
    extra = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat
        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    _WRITTEN.pop(path, None)
    results = []
    with open(path, "wb") as f:
        out = _Checksummed(f)
        for item, data in itertools.chain(bytes_data, tensor_data):
            if isinstance(data, torch.Tensor) and not data.is_cpu:
                raise ValueError(f"checkpoint writer got a tensor on {data.device} for {path}")
            results.append(_write_item(*transforms, out, data, item, storage_key, **extra))
        f.flush()
        os.fsync(f.fileno())
    if out.size != os.path.getsize(path):
        raise OSError(errno.EIO, f"wrote {out.size} bytes, the file has {os.path.getsize(path)}", path)
    _WRITTEN[path] = {"size": out.size, "crc32": f"{out.crc:08x}"}
    return results


def _file_checksum(path: str) -> dict:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def _own_shards(tmp: str) -> list[str]:
    """The shard files this rank wrote (megatron names them __<rank>_<n>.distcp)."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(tmp), f"__{_rank()}_*.distcp")))


def _all_gather(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def verify_checksums(path: str) -> None:
    """Collective. Compare every file of checkpoint directory `path` with its size and CRC-32 recorded in
    checksums.json (the files are split over the ranks); raise CheckpointError naming each damaged or
    missing file. A checkpoint without checksums.json (written before they were recorded) passes."""
    sums_path = os.path.join(path, CHECKSUMS)
    problems: list[str] = []
    names: list[str] = []
    if os.path.isfile(sums_path):
        try:
            with open(sums_path, "rb") as f:
                files = json.loads(f.read().decode("utf-8"))["files"]
            names = sorted(files)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{CHECKSUMS} itself is unreadable ({type(e).__name__}: {e})")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not problems:
        for name in names[_rank()::world]:
            full, want = os.path.join(path, name), files[name]
            if not os.path.isfile(full):
                problems.append(f"{name} is missing")
                continue
            got = _file_checksum(full)
            if got["size"] != want.get("size"):
                problems.append(f"{name} has {got['size']} bytes, {want.get('size')} recorded")
            elif got["crc32"] != want.get("crc32"):
                problems.append(f"{name} has crc32 {got['crc32']}, {want.get('crc32')} recorded")
    problems = sorted(set().union(*map(set, _all_gather(problems))))
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)} (checked against {CHECKSUMS} "
                              f"written at save; --no-verify-checksums loads it anyway)")


def _save(state: dict, save_dir: str, iteration: int, cfg: QwenVLConfig, move_marker: bool = True,
          source=None) -> str:
    final = iter_dir(save_dir, iteration)
    tmp = final + ".tmp"
    what = f"saving checkpoint iteration {iteration}"
    error = None
    if _rank() == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = e
    _agree_ok(error, tmp, what)
    try:
        strategy = _InProcessSaveStrategy("torch_dist", 1)
        strategy.source = source
        dist_checkpointing.save(state, tmp, sharded_strategy=strategy)
    # torch's CheckpointException derives from BaseException, not Exception
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with errno, path, free space
        error = e
    _agree_ok(error, tmp, what)
    sums: dict = {}
    try:  # each rank's shards were hashed as they were written (read back if not); rank 0 adds the rest below
        sums = {name: _WRITTEN.pop(os.path.join(tmp, name), None) or _file_checksum(os.path.join(tmp, name))
                for name in _own_shards(tmp)}
    except OSError as e:
        error = e
    _agree_ok(error, tmp, what)
    sums = {k: v for part in _all_gather(sums) for k, v in part.items()}
    if _rank() == 0:
        try:
            with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
                json.dump(cfg.to_hf_config(), f, indent=2)
            for name in sorted(os.listdir(tmp)):
                if name not in sums and name != CHECKSUMS and os.path.isfile(os.path.join(tmp, name)):
                    sums[name] = _file_checksum(os.path.join(tmp, name))
            with open(os.path.join(tmp, CHECKSUMS), "w") as f:
                json.dump({"algorithm": "crc32", "files": dict(sorted(sums.items()))}, f, indent=1)
            _fsync_tree(tmp)  # every rank's files reached the disk before the name says they did
            if os.path.exists(final):  # re-saving an iteration: replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(save_dir)
            if move_marker:
                _write_marker(save_dir, iteration)
            _remove_stale_temps(save_dir)
        except OSError as e:
            error = e
    _agree_ok(error, final, what)
    return final


def mark_proven(save_dir: str, iteration: int) -> None:
    """Move the marker to a checkpoint saved with `move_marker=False`, once its weights are proven (the
    next step's loss on them was finite). Collective."""
    error = None
    if _rank() == 0:
        if not os.path.isfile(os.path.join(iter_dir(save_dir, iteration), "metadata.json")):
            error = FileNotFoundError(errno.ENOENT, "checkpoint directory missing or incomplete",
                                      iter_dir(save_dir, iteration))
        else:
            try:
                _write_marker(save_dir, iteration)
            except OSError as e:
                error = e
    _agree_ok(error, os.path.join(save_dir, MARKER), f"moving the marker to iteration {iteration}")


def save_model_weights(model_chunks: list, save_dir: str, cfg: QwenVLConfig, iteration: int = 0,
                       args: Any = None, source=None) -> str:
    """Weights only (converter output, or the hand-over between training stages). Collective. With
    `source`, the model's tensors give only names and shapes (a converter's stage, never filled): the
    writer calls `source(t)` for each model tensor `t` (or a view of it) when it reaches it and writes
    what it returns (same shape and dtype), so no rank ever holds more than the tensors being written."""
    state = {"model": _model_state(model_chunks), "iteration": iteration, "checkpoint_version": FORMAT_VERSION,
             "args": _plain(args), "layout": _layout()}
    return _save(state, save_dir, iteration, cfg, source=source)


def save_checkpoint(save_dir: str, iteration: int, model_chunks: list, cfg: QwenVLConfig, optimizer,
                    scheduler=None, consumed_samples: int = 0, args: Any = None, move_marker: bool = True) -> str:
    """Everything needed to continue training bit-for-bit. Collective over all ranks. With
    `move_marker=False` the checkpoint is written but the marker stays until `mark_proven`."""
    model_sd = _model_state(model_chunks)
    has_state = _optimizer_has_state(optimizer, scheduler)
    state = {
        "model": model_sd, "iteration": iteration, "consumed_samples": consumed_samples,
        "checkpoint_version": FORMAT_VERSION, "args": _plain(args), "layout": _layout(),
        "optimizer_saved": has_state, "rng_state": _rng_object(),
    }
    if has_state:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=_SHARDING_METADATA)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return _save(state, save_dir, iteration, cfg, move_marker)


# ---------------------------------------------------------------------------------------------- load
def _load(state: dict, path: str) -> dict:
    """dist_checkpointing.load that tolerates TE `_extra_state` in either direction and names any other
    key the model and the checkpoint disagree on. Mismatches are collected on every rank and raised after
    the (collective) load, so no rank is left waiting in it."""
    try:
        loaded, missing, unexpected = dist_checkpointing.load(state, path, strict=StrictHandling.RETURN_ALL)
    # torch's CheckpointException (e.g. a missing shard file) derives from BaseException, not Exception
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    # `unexpected` (asked for, not in the checkpoint) differs per rank; `missing` is global already.
    unexpected = {k for k in unexpected if not k.endswith(EXTRA_STATE)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(unexpected))
        unexpected = set().union(*parts)
    missing = {k for k in missing if not k.endswith(EXTRA_STATE) and not k.startswith(_NOT_MODEL)}
    _raise_mismatch(path, missing, unexpected)
    return loaded


def _raise_mismatch(path: str, ckpt_only, model_only) -> None:
    problems = []
    if model_only:
        problems.append(f"the model needs keys the checkpoint does not have: {sorted(model_only)}")
    if ckpt_only:
        problems.append(f"the checkpoint has keys the model does not have: {sorted(ckpt_only)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}")


def _load_weights(model, model_sd: dict, path: str) -> None:
    """load_state_dict that lets TE modules keep their own extra state when the checkpoint (local layers)
    has none, and drops extra state a local module has no place for; anything else must match."""
    result = model.load_state_dict(model_sd, strict=False)
    _raise_mismatch(path, [k for k in result.unexpected_keys if not k.endswith(EXTRA_STATE)],
                    [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)])


def _common(path: str) -> dict:
    try:
        return dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the common state of checkpoint {path}: {e}") from e


def load_model_weights(model_chunks: list, path: str, iteration: int | None = None,
                       verify: bool = True) -> dict:
    """Copy a checkpoint's weights into the model (any TP/PP layout). Returns its common state
    (iteration, args, ...). Optimizer state in the checkpoint, if any, is ignored. Collective; with
    `verify` every file is first checked against checksums.json."""
    ckpt = resolve_checkpoint_dir(path, iteration)
    if verify:
        verify_checksums(ckpt)
    model = unwrap(model_chunks[0])
    check_model_config(ckpt, model.cfg)
    loaded = _load({"model": _model_state(model_chunks)}, ckpt)
    _load_weights(model, loaded["model"], ckpt)
    common = _common(ckpt)
    common.pop("model", None)
    return common


def load_checkpoint(path: str, model_chunks: list, optimizer=None, scheduler=None,
                    iteration: int | None = None, weights_only: bool = False, verify: bool = True) -> dict:
    """Resume: weights, then (unless `weights_only`) optimizer, scheduler and, on the same layout, RNG.

    Returns {"iteration", "consumed_samples", "args", "layout", "path"}; weights_only gives iteration 0
    and consumed_samples 0 (a new stage starts counting afresh). Collective; with `verify` every file is
    first checked against checksums.json.
    """
    ckpt = resolve_checkpoint_dir(path, iteration)
    if verify:
        verify_checksums(ckpt)
    check_model_config(ckpt, unwrap(model_chunks[0]).cfg)
    common = _common(ckpt)
    if weights_only:
        load_model_weights(model_chunks, ckpt, verify=False)
        return {"iteration": 0, "consumed_samples": 0, "args": common.get("args", {}),
                "layout": common.get("layout"), "path": ckpt}
    if "consumed_samples" not in common:
        raise CheckpointError(f"{ckpt} holds weights only (no optimizer state); load it with "
                              f"--load-weights-only (or --pretrained-checkpoint)")
    model_sd = _model_state(model_chunks)
    state: dict = {"model": model_sd}
    load_optimizer = optimizer is not None and common.get("optimizer_saved", True)
    if load_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                          metadata=_SHARDING_METADATA)
    same_layout = common.get("layout") == _layout()
    if same_layout:
        state["rng_state"] = _rng_object()
    loaded = _load(state, ckpt)
    _load_weights(unwrap(model_chunks[0]), loaded["model"], ckpt)
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        _set_rng(loaded["rng_state"])
    return {"iteration": int(loaded["iteration"]), "consumed_samples": int(loaded.get("consumed_samples", 0)),
            "args": loaded.get("args", {}), "layout": common.get("layout"), "path": ckpt}


__all__ = ["CheckpointError", "CheckpointSaveError", "mark_proven", "describe_save_error", "save_checkpoint", "load_checkpoint", "save_model_weights", "load_model_weights",
           "read_model_config", "check_model_config", "config_differences", "latest_iteration",
           "resolve_checkpoint_dir", "iter_dir", "verify_checksums", "MARKER", "MODEL_CONFIG", "CHECKSUMS"]
