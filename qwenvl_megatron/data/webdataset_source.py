"""WebDataset tar shards and energon-prepared datasets -> the project's caption / vqa records.

Two sources, both read by their own libraries (optional dependencies, imported only when such an input is
given; without them a one-line :class:`MissingDependencyError` names the package):

- **plain WebDataset shards** (``*.tar``, e.g. written by ``img2dataset``): ``webdataset``'s tar iterator
  and key grouping. Per key an image (``jpg``/``jpeg``/``png``/``webp``) and a ``txt`` caption or a ``json``
  with ``caption`` (caption record) or ``question`` + ``answer``/``answers`` (vqa record).
- **energon datasets** (a directory with ``.nv-meta/`` written by ``energon prepare``): ``megatron-energon``
  reads ``dataset.yaml`` (sample type, ``field_map`` or ``sample_loader``), the split (``split.yaml``,
  excludes included) and the tar index, and builds its own ``CaptioningSample`` / ``VQASample``. Images are
  kept as their encoded bytes (energon's decoder is replaced by webdataset's basic handlers, which decode
  ``txt``/``json`` parts only), so the indexed dataset stores the original file.

Each key yields one :class:`SourceItem`: a record plus its image bytes, or a reject reason. A corrupt part,
a missing member or a truncated shard rejects that key (or, for a truncated plain tar, the key being read
and whatever followed it); the caller goes on with the next key.
"""
from __future__ import annotations

import importlib
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

IMAGE_PARTS = ("jpg", "jpeg", "png", "webp")
ENERGON_META = ".nv-meta"
SUPPORTED_ENERGON_SAMPLES = ("CaptioningSample", "VQASample")


class MissingDependencyError(ImportError):
    """An optional package needed for this input is not installed; the message is one line."""


class PartError(ValueError):
    """A sample's parts do not make a caption / vqa record (a part missing, the wrong type)."""


class SourceError(ValueError):
    """The dataset as a whole cannot be read (no dataset.yaml, unsupported sample type, unknown split)."""


@dataclass
class SourceItem:
    """One key of a shard: ``record`` + ``images`` (reference -> encoded bytes), or ``reason`` (a reject)."""

    shard: str                     # path of the tar shard
    key: str | None                # sample key inside the shard (None: the shard as a whole)
    record: dict | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    reason: str | None = None


def _require(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"reading {what} needs the '{package}' package: pip install {package} "
                                     f"(or pip install -e .[data])") from None


def require_webdataset(what: str) -> None:
    """Raises MissingDependencyError (one line) when ``webdataset`` is not installed."""
    _require("webdataset.tariterators", "webdataset", f"the WebDataset shard {what}")


def is_energon_dataset(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ENERGON_META))


# --------------------------------------------------------------------------------- record mapping
def _pick_answer(answers: Any, weights: Any) -> str | None:
    """One answer for the vqa template: a string as is; of a list, the highest weight (the first on ties),
    or without weights the most frequent answer (the first given on ties). None when there is none."""
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, (list, tuple)) or not answers:
        return None
    if weights is not None:
        weights = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
        if len(weights) != len(answers):
            raise PartError(f"{len(answers)} answers but {len(weights)} answer_weights")
        return answers[max(range(len(answers)), key=lambda i: (weights[i], -i))]
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PartError(f"part '{name}' is not UTF-8 text (byte 0x{value[e.start]:02x} at {e.start})") from None
    return value


def record_from_parts(key: str, parts: dict[str, Any]) -> tuple[dict, dict[str, bytes]]:
    """A plain WebDataset sample (part name -> value; ``txt``/``json`` already decoded) -> (record, images).
    Raises ValueError naming the missing or malformed part."""
    image_part = next((p for p in IMAGE_PARTS if p in parts), None)
    if image_part is None:
        raise PartError(f"no image part ({'/'.join(IMAGE_PARTS)}) for key; parts: {sorted(parts)}")
    image = parts[image_part]
    reference = f"{key}.{image_part}"
    meta = parts.get("json")
    if meta is not None and not isinstance(meta, dict):
        raise PartError(f"{key}.json must hold an object, got {type(meta).__name__}")
    meta = meta or {}
    question = meta.get("question", meta.get("context"))
    if question is not None:
        answer = _pick_answer(meta.get("answer", meta.get("answers")), meta.get("answer_weights"))
        record = {"task": "vqa", "image": reference, "question": question, "answer": answer}
    else:
        caption = _text(parts["txt"], "txt") if "txt" in parts else meta.get("caption", meta.get("text"))
        if caption is None:
            raise PartError("no caption (.txt, or .json with a 'caption' field) and no question for key")
        record = {"task": "caption", "image": reference, "caption": caption}
    return record, {reference: image}


def record_from_energon(sample: Any, reference: str) -> tuple[dict, dict[str, bytes]]:
    """An energon ``CaptioningSample`` / ``VQASample`` (image left as encoded bytes) -> (record, images)."""
    image = sample.image
    if not isinstance(image, (bytes, bytearray)):
        raise PartError(f"field 'image' of the {type(sample).__name__} is {type(image).__name__}, expected the "
                         f"encoded image bytes (the dataset's field_map / sample_loader must pass the image "
                         f"part through unchanged)")
    if hasattr(sample, "caption"):
        record = {"task": "caption", "image": reference, "caption": _text(sample.caption, "caption")}
    else:
        answer = _pick_answer(sample.answers, sample.answer_weights)
        if answer is None:
            raise PartError(f"field 'answers' of the VQASample is {sample.answers!r:.60}: no answer to train on")
        record = {"task": "vqa", "image": reference, "question": _text(sample.context, "context"),
                  "answer": answer}
    return record, {reference: bytes(image)}


# --------------------------------------------------------------------------------- plain tar shards
def iter_tar_shard(path: str) -> Iterator[SourceItem]:
    """The keys of a plain WebDataset tar shard, read by ``webdataset`` (members grouped by key). A read
    error (a truncated shard) rejects the key being read, naming what could not be read after it."""
    tariterators = _require("webdataset.tariterators", "webdataset", f"WebDataset shard {path}")
    autodecode = _require("webdataset.autodecode", "webdataset", f"WebDataset shard {path}")
    decode = autodecode.Decoder([])  # txt -> str, json -> object; images stay encoded bytes
    state: dict[str, Any] = {"name": None, "error": None}

    def seen(name: str) -> bool:  # webdataset's file selector: remembers the member being read
        state["name"] = name
        return True

    def stop(exc: Exception) -> bool:  # webdataset's error handler: stop the shard, report below
        state["error"] = exc
        return False

    def members(stream):
        try:
            for item in tariterators.tar_file_iterator(stream, handler=stop, select_files=seen):
                item["__url__"] = path
                yield item
        except (tarfile.TarError, OSError, EOFError) as e:  # a header that cannot be read
            state["error"] = e

    with open(path, "rb") as stream:
        pending = None  # one key held back: if the shard breaks, its last key may be incomplete
        for sample in tariterators.group_by_keys(members(stream)):
            if pending is not None:
                yield _tar_item(path, pending, decode)
            pending = sample
        if state["error"] is not None:
            broken_key = tariterators.base_plus_ext(state["name"] or "")[0] if state["name"] else None
            if pending is not None and pending["__key__"] != broken_key:
                yield _tar_item(path, pending, decode)
            error = state["error"]
            detail = str(error.args[0]).split(" @ ")[0] if error.args else type(error).__name__
            yield SourceItem(path, broken_key, reason=f"truncated or damaged tar shard: {type(error).__name__}: "
                                                      f"{detail} while reading member {state['name']!r}; "
                                                      f"nothing after it could be read")
        elif pending is not None:
            yield _tar_item(path, pending, decode)


def _tar_item(path: str, sample: dict, decode) -> SourceItem:
    key = sample["__key__"]
    try:
        parts = decode({k: v for k, v in sample.items() if k != "__url__"})
        parts = {k: v for k, v in parts.items() if not k.startswith("__")}
        record, images = record_from_parts(key, parts)
    except Exception as e:  # webdataset's decoders raise what json / UTF-8 raise
        return SourceItem(path, key, reason=_message(e))
    return SourceItem(path, key, record, images)


def _message(e: Exception) -> str:
    """Our own mapping errors as written; a library's error with its type (first argument only: webdataset
    appends stream objects to ``args``), at most 300 characters."""
    if type(e).__name__ == "DecodingError" and hasattr(e, "k"):  # webdataset's decoder: name the part
        cause = e.__cause__
        return f"part '{e.k}' cannot be decoded: {type(cause).__name__}: {cause}"[:300]
    text = str(e.args[0]) if e.args else ""
    return (text if isinstance(e, PartError) else f"{type(e).__name__}: {text}")[:300]


# ----------------------------------------------------------------------------------- energon datasets
class _KeepImageBytes:
    """Stands in for energon's SampleDecoder: webdataset's basic handlers decode ``txt``/``json``/``cls``
    parts, image parts stay the encoded file (energon's default would decode them to tensors)."""

    def __init__(self):
        self._decode = _require("webdataset.autodecode", "webdataset", "an energon dataset").Decoder([])

    def __call__(self, sample: dict) -> dict:
        return self._decode(sample)

    def config(self) -> dict:
        return {"image_decode": "encoded bytes (qwenvl_megatron)"}


_FACTORIES: dict[tuple[str, str], Any] = {}


def energon_factory(path: str, split_part: str = "train"):
    """energon's dataset factory for ``path`` (cached per process); raises SourceError for a dataset that
    cannot be read or whose sample type is not captioning or VQA."""
    cache_key = (os.path.abspath(path), split_part)
    if cache_key in _FACTORIES:
        return _FACTORIES[cache_key]
    _require("megatron.energon", "megatron-energon", f"the energon dataset {path}")
    from megatron.energon import WorkerConfig
    from megatron.energon.dataset_config import get_dataset_from_config
    try:
        factory = get_dataset_from_config(path, split_part=split_part, training=False,
                                          worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                          decoder=_KeepImageBytes())
    except MissingDependencyError:
        raise
    except Exception as e:  # energon raises assertions, ValueError, FileNotFoundError, yaml errors
        raise SourceError(f"{path}: cannot open the energon dataset (split part {split_part!r}, "
                          f"{ENERGON_META}/dataset.yaml): {type(e).__name__}: {e}") from None
    sample_type = getattr(factory, "__sample_type__", None)
    names = {c.__name__ for c in getattr(sample_type, "__mro__", ())}
    if not names & set(SUPPORTED_ENERGON_SAMPLES):
        raise SourceError(f"{path}: energon sample type {getattr(sample_type, '__name__', sample_type)} is not "
                          f"supported; expected one of {list(SUPPORTED_ENERGON_SAMPLES)} (or a subclass)")
    _FACTORIES[cache_key] = factory
    return factory


def energon_shards(path: str, split_part: str = "train") -> list[str]:
    """The shard names of ``split_part``, in energon's order."""
    return [shard.name for shard in energon_factory(path, split_part).shards]


def _energon_key(path: str, shard_name: str, index: int) -> str | None:
    """The key of sample ``index`` of a shard, from energon's sqlite index (for samples that cannot be read)."""
    try:
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.indexing import SqliteIndexReader
        from megatron.energon.flavors.webdataset.metadata import get_info_shard_files
        tar_id = get_info_shard_files(EPath(path)).index(shard_name)
        reader = SqliteIndexReader(EPath(path) / ENERGON_META / "index.sqlite")
        try:
            row = reader.db.select_one("SELECT sample_key FROM samples WHERE tar_file_id = ? AND sample_index = ?",
                                       (tar_id, index))
        finally:
            reader.close()
        return row[0] if row else None
    except Exception:  # an older dataset without index.sqlite: the position names the sample
        return None


def iter_energon_shard(path: str, shard_name: str, split_part: str = "train") -> Iterator[SourceItem]:
    """The samples of one shard of an energon dataset, in index order, loaded by energon (its tar index,
    part filter, sample excludes, field_map / sample_loader, sample type)."""
    from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader
    factory = energon_factory(path, split_part)
    shard = next(s for s in factory.shards if s.name == shard_name)
    shard_path = os.path.join(path, shard_name)
    reader = ShardInfosITarReader(factory.path, [shard], part_filter=factory.part_filter,
                                  sample_filter=factory.sample_filter, itar_cache_size=1)
    try:
        for index in range(shard.count):
            key = None
            try:
                raw = reader[index]
                if raw is None:  # excluded by the split config
                    continue
                key = raw["__key__"]
                sample = factory.load_sample(raw)
                record, images = record_from_energon(sample, f"{shard_name}/{key}")
            except Exception as e:  # energon: FieldAccessError, tar errors; decoders: json / UTF-8 errors
                if key is None:
                    key = _energon_key(path, shard_name, index) or f"#{index}"
                    reason = f"sample {index} cannot be read from the shard (truncated or damaged?): {_message(e)}"
                else:
                    reason = _message(e)
                yield SourceItem(shard_path, key, reason=reason)
                continue
            yield SourceItem(shard_path, key, record, images)
    finally:
        reader.close()
