#!/usr/bin/env python
"""How fast does the tiny ViT + adapter learn the demo's shapes? A one-process probe for sizing the demo.

    vision_probe.py --data-dir DATA [--image-size 40] [--patch-size 5] [--steps 600] [--seed 0]

DATA is a corpus from tools/make_synthetic_dataset.py. The probe trains the real ViT and adapter of the tiny
preset (megatron-core layers, one process) under a small classification head that reads the mean of the
adapter's queries, on the shape and colour of the stage-1 caption images, and prints held-out shape and
colour accuracy every 100 steps. No language model, no schedule: a quick answer (about a minute) to "can
this image size / patch size / init be learned in the demo's budget?". docs/demo.md records what it said.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def load_split(path: str, image_size: int, limit: int):
    """(normalised images [n, 3, S, S], labels [n, 2] = shape index, colour index) of a file's caption records."""
    from qwenvl_megatron.data.formats import iter_records, resolve_image_path
    from qwenvl_megatron.data.images import ImageTransform
    from qwenvl_megatron.data.synthetic import COLOURS, SHAPES

    blobs, labels = [], []
    for _, rec in iter_records(path):
        if rec.get("task") != "caption":
            continue
        words = rec["caption"].split()
        labels.append((next(SHAPES.index(w) for w in words if w in SHAPES),
                       next(list(COLOURS).index(w) for w in words if w in COLOURS)))
        with open(resolve_image_path(rec["image"], path), "rb") as f:
            blobs.append(f.read())
        if len(blobs) == limit:
            break
    return ImageTransform(image_size, backend="pil")(blobs), torch.tensor(labels)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-size", type=int, default=40)
    p.add_argument("--patch-size", type=int, default=None, help="default: image size / 8 (the preset's grid)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-method-std", type=float, default=0.125)
    p.add_argument("--num-train", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from qwenvl_megatron.data.synthetic import COLOURS, SHAPES
    from qwenvl_megatron.models.config import tiny
    from qwenvl_megatron.models.parallel import ParallelPlan
    from qwenvl_megatron.models.qwen_vl import QwenVLModel
    from qwenvl_megatron.runtime import initialize

    patch = args.patch_size or args.image_size // 8
    cfg = tiny().replace(vit={"image_size": args.image_size, "patch_size": patch}).validate()
    initialize(1, 1, args.seed)
    torch.manual_seed(args.seed)
    model = QwenVLModel(cfg, ParallelPlan(init_std=args.init_method_std).validate(cfg))
    t0 = time.time()
    x_train, y_train = load_split(os.path.join(args.data_dir, "stage1.jsonl"), args.image_size, args.num_train)
    x_test, y_test = load_split(os.path.join(args.data_dir, "heldout.jsonl"), args.image_size, 500)
    print(f"loaded {len(x_train)} training and {len(x_test)} held-out images in {time.time() - t0:.0f} s; "
          f"{args.image_size} px in {patch} px patches", flush=True)

    n_shapes, h = len(SHAPES), cfg.llm.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, 128), torch.nn.GELU(), torch.nn.Linear(128, n_shapes + len(COLOURS)))
    params = [q for n, q in model.named_parameters() if n.startswith(("vision.", "adapter."))] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

    def logits(x):
        return head(model.encode_images(x).mean(1))

    order = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=order)
        out, y = logits(x_train[idx]), y_train[idx]
        loss = F.cross_entropy(out[:, :n_shapes], y[:, 0]) + F.cross_entropy(out[:, n_shapes:], y[:, 1])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                out = torch.cat([logits(x_test[i:i + 100]) for i in range(0, len(x_test), 100)])
            shape = (out[:, :n_shapes].argmax(1) == y_test[:, 0]).float().mean().item()
            colour = (out[:, n_shapes:].argmax(1) == y_test[:, 1]).float().mean().item()
            print(f"step {step} | loss {loss.item():.3f} | held-out shape {shape:.3f} | colour {colour:.3f} | "
                  f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
