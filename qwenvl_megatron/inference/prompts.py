"""Free-text prompts -> token ids and the images they name.

A prompt may name images inline as `<img>path</img>` (the release's convention): each becomes `<img>`,
`num_image_tokens` `<imgpad>` ids and `</img>`, and the path is returned so the caller can load the pixels.
The rest of the text is encoded with special tokens allowed, so a user can write `<ref>..</ref><box>`.
"""
from __future__ import annotations

import re

from ..data.tokenizer import Tokenizer

_IMAGE = re.compile(r"<img>(.*?)</img>", re.S)


def encode_prompt(text: str, tokenizer: Tokenizer, num_image_tokens: int,
                  image: str | None = None) -> tuple[list[int], list[str]]:
    """(token ids, image paths in order). `image` is prepended as `<img>image</img>` unless the text
    already names its images."""
    if image is not None and not _IMAGE.search(text):
        text = f"<img>{image}</img>{text}"
    ids: list[int] = []
    paths: list[str] = []
    pos = 0
    for m in _IMAGE.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos:m.start()], allow_special=True)
        path = m.group(1).strip()
        if not path:
            raise ValueError(f"empty <img></img> in prompt {text[:80]!r}")
        paths.append(path)
        ids += [tokenizer.img_start_id] + [tokenizer.img_pad_id] * num_image_tokens + [tokenizer.img_end_id]
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:], allow_special=True)
    if not ids:
        raise ValueError("empty prompt")
    return ids, paths
