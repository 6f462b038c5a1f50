"""Tokenizers behind one interface: the real Qwen BPE (tiktoken) and a small SentencePiece model.

Everything downstream (sample formats, the model's image-span lookup, generation) reads special ids
from the tokenizer object, so the tiny CPU demo and the real 151,936-row vocabulary run the same code.
Plain text never produces a special id unless the caller passes ``allow_special=True``: a caption that
happens to contain "<img>" must not open an image span.
"""
from __future__ import annotations

import base64
import os
import re
import unicodedata
from typing import Iterable

# Special tokens and the attribute that holds each one's id (reference 1.4).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"

NUM_QWEN_EXTRA_TOKENS = 205
QWEN_EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(NUM_QWEN_EXTRA_TOKENS))
TAG_TOKENS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
# The order of the Qwen release: ids 151643, 151644, ... follow this tuple.
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + QWEN_EXTRA_TOKENS + TAG_TOKENS
# The SentencePiece demo vocabulary keeps the named specials but not the 205 unused extras.
SENTENCEPIECE_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + TAG_TOKENS

_ID_ATTRIBUTES = {
    "eod_id": ENDOFTEXT,
    "pad_id": ENDOFTEXT,  # Qwen pads with <|endoftext|>; padding positions carry label -100 anyway
    "im_start_id": IM_START,
    "im_end_id": IM_END,
    "ref_start_id": REF_START,
    "ref_end_id": REF_END,
    "box_start_id": BOX_START,
    "box_end_id": BOX_END,
    "quad_start_id": QUAD_START,
    "quad_end_id": QUAD_END,
    "img_start_id": IMG_START,
    "img_end_id": IMG_END,
    "img_pad_id": IMG_PAD,
}

# Reference 1.5: the pre-tokenisation regex of Qwen's BPE.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_NUM_RANKS = 151643


class TokenizerFileError(ValueError):
    """A vocabulary / model file is missing or malformed; the message names the file."""


class Tokenizer:
    """The shared interface. Subclasses set ``vocab_size`` and ``special_ids`` (token string -> id).

    Attributes ``eod_id``, ``pad_id``, ``im_start_id``, ``im_end_id``, ``img_start_id``, ``img_end_id``,
    ``img_pad_id``, ``ref_start_id``, ``ref_end_id``, ``box_start_id``, ``box_end_id``, ``quad_start_id``,
    ``quad_end_id`` are derived from ``special_ids``.
    """

    vocab_size: int
    special_ids: dict[str, int]

    def _set_id_attributes(self) -> None:
        for attribute, token in _ID_ATTRIBUTES.items():
            setattr(self, attribute, self.special_ids[token])
        self._special_by_id = {i: t for t, i in self.special_ids.items()}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_id(self, special_token: str) -> int:
        """Id of one special token string, e.g. ``token_id("<box>")``."""
        try:
            return self.special_ids[special_token]
        except KeyError:
            raise KeyError(f"{special_token!r} is not a special token of this tokenizer") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a ``base64_token rank`` file, checking that ranks are exactly 0..N-1."""
    if not os.path.isfile(path):
        raise TokenizerFileError(f"Qwen vocabulary file not found: {path} (expected qwen.tiktoken, "
                                 f"e.g. from the dashscope package's resources/)")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError as e:
                raise TokenizerFileError(f"{path}:{line_no}: malformed line {line[:60]!r} "
                                         f"(expected 'base64_token rank'): {e}") from None
            if token in ranks:
                raise TokenizerFileError(f"{path}:{line_no}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class QwenTokenizer(Tokenizer):
    """Qwen's byte-level BPE: tiktoken ranks from ``qwen.tiktoken`` plus the release's special ids."""

    def __init__(self, vocab_file: str):
        import tiktoken

        ranks = _read_tiktoken_ranks(vocab_file)
        if len(ranks) != QWEN_NUM_RANKS:
            raise TokenizerFileError(f"{vocab_file}: has {len(ranks)} ranks, the Qwen vocabulary has "
                                     f"{QWEN_NUM_RANKS}; the special ids would not match the release")
        self.vocab_file = vocab_file
        self.special_ids = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids)
        self.vocab_size = self._encoding.n_vocab  # 151860 real tokens; the model pads its rows itself
        self._set_id_attributes()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        # As the release's QWenTokenizer.tokenize: NFC first, so "e" + U+0301 encodes as "é" does.
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return self._encoding.decode(ids, errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special symbols are single control pieces.

    Control pieces (not user-defined ones) are used on purpose: SentencePiece always matches
    user-defined symbols inside raw text, so a caption containing "<img>" would silently open an image
    span. Control pieces are never produced from text; ``encode(..., allow_special=True)`` maps them.
    """

    def __init__(self, model_file: str):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise TokenizerFileError(f"SentencePiece model not found: {model_file}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse text
            raise TokenizerFileError(f"{model_file}: not a valid SentencePiece model: {e}") from None
        self.model_file = model_file
        self.special_ids = {}
        for token in SENTENCEPIECE_SPECIAL_TOKENS:
            token_id = self._sp.piece_to_id(token)
            if token_id == self._sp.unk_id() or not self._sp.is_control(token_id):
                raise TokenizerFileError(f"{model_file}: special token {token!r} is not a control piece; "
                                         f"train the model with tools/train_tokenizer.py")
            self.special_ids[token] = token_id
        self.vocab_size = self._sp.get_piece_size()
        self._special_regex = re.compile("|".join(
            re.escape(t) for t in sorted(self.special_ids, key=len, reverse=True)))
        self._set_id_attributes()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._special_regex.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start:match.start()])
            ids.append(self.special_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # sentencepiece renders control pieces as "", so decode ordinary runs and splice specials in.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"cannot decode id {i} outside the vocabulary [0, {self.vocab_size})")
            if i in self._special_by_id:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._special_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, output_prefix: str,
                        model_type: str = "unigram", verbose: bool = False) -> str:
    """Train a SentencePiece model usable by :class:`SentencePieceTokenizer`; returns the .model path.

    Settings chosen so that concatenated encodes decode to the concatenated text (no dummy prefix, no
    whitespace collapsing, identity normalisation), box coordinates split into single digits, and any
    character stays encodable (byte fallback).
    """
    import sentencepiece as spm

    min_size = len(SENTENCEPIECE_SPECIAL_TOKENS) + 1 + 256 + 20  # specials + <unk> + bytes + some pieces
    if vocab_size < min_size:
        raise ValueError(f"--vocab-size {vocab_size} is too small: specials, <unk> and the 256 byte-fallback "
                         f"pieces alone take {min_size - 20}; use at least {min_size}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        control_symbols=list(SENTENCEPIECE_SPECIAL_TOKENS),
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        required_chars="0123456789(),:",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may not support the requested size: train what it can
        minloglevel=0 if verbose else 2,
    )
    return output_prefix + ".model"


def build_tokenizer(kind: str, path: str) -> Tokenizer:
    """``kind``: "qwen" (path to qwen.tiktoken) or "sentencepiece" (path to a .model file)."""
    if kind == "qwen":
        return QwenTokenizer(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'qwen' or 'sentencepiece'")


def default_qwen_vocab_path() -> str:
    """$QWEN_TIKTOKEN if set, else the copy that tools/setup_env.sh places in <repo>/.venv/share/."""
    env = os.environ.get("QWEN_TIKTOKEN")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, ".venv", "share", "qwen.tiktoken")
