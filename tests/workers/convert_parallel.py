"""torchrun worker (4 ranks, TP2 x PP2): the conversions and generation on a parallel layout.

Inputs under --work (written by tests/test_convert_parallel.py): hf/ (tiny Qwen-VL, .bin shards),
qwen7b/ (its LLM part), openclip.bin, import_config.json, gen_inputs.pt (prompt ids + images).
Outputs: m/ (hf-to-mcore), hf_back/ (mcore-to-hf of m), m_init/ + hf_init/ (import-init and its export),
gen.pt (rank 0: prompt logits, cached and uncached greedy generations), done.json.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    w = p.parse_args().work
    from qwenvl_megatron.convert import conversion
    from qwenvl_megatron.inference.generation import greedy_generate, prompt_logits
    from qwenvl_megatron.runtime import initialize

    initialize(2, 2, seed=7)
    conversion.hf_to_mcore(f"{w}/hf", f"{w}/m", "fp32")
    conversion.mcore_to_hf(f"{w}/m", f"{w}/hf_back")
    cfg = conversion.import_config(f"{w}/qwen7b", f"{w}/import_config.json")
    conversion.import_init(f"{w}/qwen7b", f"{w}/openclip.bin", f"{w}/m_init", cfg)
    conversion.mcore_to_hf(f"{w}/m_init", f"{w}/hf_init")

    inputs = torch.load(f"{w}/gen_inputs.pt")
    _, model = conversion.load_mcore_stage(f"{w}/m")
    ids, images = inputs["ids"], inputs["images"]
    logits = prompt_logits(model, ids, images)
    kw = dict(stop_ids=(), banned_ids=inputs["banned"])
    cached = greedy_generate(model, ids, images, inputs["steps"], use_cache=True, **kw)
    plain = greedy_generate(model, ids, images, inputs["steps"], use_cache=False, **kw)
    if dist.get_rank() == 0:
        torch.save({"prompt_logits": logits, "cached_tokens": cached.tokens, "cached_logits": cached.step_logits,
                    "plain_tokens": plain.tokens, "plain_logits": plain.step_logits}, f"{w}/gen.pt")
    # every rank must agree on the tokens (they drive the next step on every stage)
    mine = torch.tensor(cached.tokens)
    agree = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(agree, mine)
    if dist.get_rank() == 0:
        with open(f"{w}/done.json", "w") as f:
            json.dump({"ranks_agree": all(a.equal(mine) for a in agree)}, f)


if __name__ == "__main__":
    main()
