"""Greedy decoding with megatron's KV cache gives the tokens and logits of full recomputation (one process;
tests/test_convert_parallel.py checks the same under TP 2 x PP 2). Decoding runs without cpu_compat's
function-mode hook: this also checks that it asks for no CUDA tensor on the way."""
import torch

from qwenvl_megatron.data.loader import MockLoader
from qwenvl_megatron.inference.generation import greedy_generate
from qwenvl_megatron.models.config import tiny
from qwenvl_megatron.models.parallel import ParallelPlan
from qwenvl_megatron.runtime import initialize
from qwenvl_megatron.training.step import build_model


def test_kv_cache_gives_the_tokens_and_logits_of_recomputation():
    cfg = tiny().replace(vit={"image_size": 56})
    q = cfg.adapter.num_queries
    initialize(1, 1, seed=3)
    (model,) = build_model(cfg, ParallelPlan(), wrap_ddp=False)
    loader = MockLoader(2, q + 12, cfg.llm.vocab_size, 56, cfg.image_start_id, q, seed=4)
    batch = loader.microbatch(0)
    prompt, images = batch["input_ids"][:, : q + 9], batch["images"]
    steps = 10
    cached = greedy_generate(model, prompt, images, steps)
    plain = greedy_generate(model, prompt, images, steps, use_cache=False)
    assert [len(t) for t in cached.tokens] == [steps, steps]
    assert cached.tokens == plain.tokens
    assert cached.step_logits.shape == (2, steps, cfg.llm.vocab_size)
    assert (cached.step_logits - plain.step_logits).abs().max() <= 1e-5
    # the logits choose the tokens (random weights: not a constant sequence)
    assert cached.step_logits.argmax(-1).tolist() == cached.tokens
    assert len({t for row in cached.tokens for t in row}) > 1
