"""Self-checks of the reference Qwen-VL (tests/reference_qwenvl.py) against the documented facts.

The reference is the ground truth for the Megatron model, so each check here compares it with an
independent formulation (torch.nn.MultiheadAttention, explicit math loops, a numpy bicubic kernel).
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference_qwenvl as ref


@pytest.fixture(scope="module")
def tiny():
    cfg = ref.tiny_hf_config()
    model = ref.ReferenceQwenVL(cfg).eval()
    model.load_state_dict(ref.random_hf_state_dict(cfg, seed=0), strict=True)
    return cfg, model


def numpy_bicubic_matrix(n_in, n_out, a=-0.75):
    """[n_out, n_in] 1D bicubic (Keys, A=-0.75) resampling matrix, align_corners=False, clamped edges."""
    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        for off in range(-1, 3):
            m[i, min(max(i0 + off, 0), n_in - 1)] += kernel(src - (i0 + off))
    return m


def numpy_resize(table, n_cells):
    src, dst = math.isqrt(table.shape[0]), math.isqrt(n_cells)
    m = numpy_bicubic_matrix(src, dst)
    grid = table.double().numpy().reshape(src, src, -1)
    out = np.einsum("ir,rcd,jc->ijd", m, grid, m)
    return torch.from_numpy(out.reshape(dst * dst, -1)).float()


def with_image(length, n_queries, ids_, at, rng):
    start, end, pad = ids_
    row = torch.randint(0, start, (length,), generator=rng)
    row[at], row[at + 1:at + 1 + n_queries], row[at + 1 + n_queries] = start, pad, end
    return row


def test_adapter_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    want, _ = mha(q, k, v, need_weights=False)
    got = ref.cross_attention(q, k, v, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                              mha.out_proj.bias, heads=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_adapter_adds_positions_to_q_and_k_not_v(tiny):
    cfg, model = tiny
    pool = copy.deepcopy(model.transformer.visual.attn_pool)
    with torch.no_grad():  # sharper attention, so that the key positions visibly matter
        pool.attn.in_proj_weight.mul_(10)
    out_dim = cfg["visual"]["output_dim"]
    mha = torch.nn.MultiheadAttention(out_dim, cfg["visual"]["attn_pool_heads"], batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(pool.attn.in_proj_weight)
        mha.in_proj_bias.copy_(pool.attn.in_proj_bias)
        mha.out_proj.load_state_dict(pool.attn.out_proj.state_dict())
    x = torch.randn(2, 256, cfg["visual"]["width"])  # a 16x16 token grid: 4x4 pos_embed is resized
    ln = lambda t, m: F.layer_norm(t, t.shape[-1:], m.weight, m.bias, 1e-6)
    kv = ln(x @ pool.kv_proj.weight.T, pool.ln_kv)
    q = (ln(pool.query, pool.ln_q) + pool.pos_embed).expand(2, -1, -1)
    want, _ = mha(q, kv + numpy_resize(pool.pos_embed, 256), kv, need_weights=False)
    torch.testing.assert_close(pool(x), want, rtol=1e-4, atol=1e-5)


def test_vit_in_proj_is_per_head_interleaved(tiny):
    cfg, model = tiny
    attn = model.transformer.visual.transformer.resblocks[0].attn
    w, heads = cfg["visual"]["width"], cfg["visual"]["heads"]
    mha = torch.nn.MultiheadAttention(w, heads, batch_first=True)
    blocked = lambda t: t.reshape(heads, 3, w // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    with torch.no_grad():  # [h0: q k v | h1: q k v ...] -> [all q | all k | all v]
        mha.in_proj_weight.copy_(blocked(attn.in_proj.weight))
        mha.in_proj_bias.copy_(blocked(attn.in_proj.bias))
        mha.out_proj.load_state_dict(attn.out_proj.state_dict())
    x = torch.randn(2, 9, w)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def test_sincos_2d_table_structure():
    dim, grid = 16, 4
    table = ref.sincos_2d(dim, grid)
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            row = table[r * grid + c]
            for i in range(quarter):
                omega = 10000 ** (-i / quarter)
                want = [math.sin(c * omega), math.cos(c * omega), math.sin(r * omega), math.cos(r * omega)]
                got = [row[i], row[quarter + i], row[2 * quarter + i], row[3 * quarter + i]]
                assert [float(g) for g in got] == pytest.approx(want, abs=1e-6), (r, c, i)
    big = ref.sincos_2d(4096, 16)
    assert big.shape == (256, 4096)
    torch.testing.assert_close(big[0], torch.tensor([0.0] * 1024 + [1.0] * 1024 + [0.0] * 1024 + [1.0] * 1024))
    cfg = ref.tiny_hf_config()
    sd = ref.random_hf_state_dict(cfg, seed=3)
    torch.testing.assert_close(sd["transformer.visual.attn_pool.pos_embed"], ref.sincos_2d(64, 4))


def test_rotary_is_rotate_half_base_10000():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 3, 4)
    got = ref.rotary(x, 10000)[0, 0, 2]  # position 2, frequencies 1 and 1/100
    a0, a1 = 2.0, 2.0 / 100
    want = torch.tensor([1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
                         3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)])
    torch.testing.assert_close(got, want)
    q, k = torch.randn(16).expand(1, 1, 12, 16), torch.randn(16).expand(1, 1, 12, 16)
    scores = ref.rotary(q, 10000)[0, 0] @ ref.rotary(k, 10000)[0, 0].T  # depends only on m - n
    torch.testing.assert_close(scores[7, 4], scores[5, 2])
    torch.testing.assert_close(scores[11, 3], scores[8, 0])


def test_state_dict_and_counts_agree_with_module(tiny):
    cfg, model = tiny
    assert set(model.state_dict()) == set(ref.hf_key_shapes(cfg))
    assert sum(ref.param_counts(cfg).values()) == sum(t.numel() for t in model.state_dict().values())
    bad = ref.random_hf_state_dict(cfg, seed=0)
    del bad["transformer.visual.attn_pool.ln_kv.bias"]
    with pytest.raises(RuntimeError, match="ln_kv.bias"):
        ref.ReferenceQwenVL(cfg).load_state_dict(bad, strict=True)


def test_7b_param_counts():
    counts = ref.param_counts(ref.hf_config())
    print("Qwen-VL 7B parameters:", {k: f"{v / 1e9:.3f}B" for k, v in counts.items()})
    h, v, L, ffn = 4096, 151936, 32, 11008
    assert counts["llm"] == 2 * v * h + h + L * (3 * h * h + 3 * h + h * h + 3 * ffn * h + 2 * h)
    w, f = 1664, 8192
    vit_layer = 3 * w * w + 3 * w + w * w + w + 2 * w * f + f + w + 4 * w
    assert counts["vit"] == 3 * 14 * 14 * w + 256 * w + 2 * w + 48 * vit_layer + 2 * h + h * h
    assert counts["adapter"] == 2 * 256 * h + h * w + 3 * h * h + 3 * h + h * h + h + 4 * h
    assert round(counts["vit"] / 1e9, 1) == 1.9
    assert round(counts["adapter"] / 1e9, 2) == 0.08
    assert round(counts["llm"] / 1e9, 1) == 7.7
    assert 9.6 <= sum(counts.values()) / 1e9 < 9.7


def test_causal_masking(tiny):
    cfg, model = tiny
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 100
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[0, 10:] - b[0, 10:]).abs().amax(-1).min() > 1e-3


def test_image_spans_fill_in_order_and_change_only_later_positions(tiny):
    cfg, model = tiny
    nq, ids_ = model.n_queries, ref.image_token_ids(cfg)
    rng = torch.Generator().manual_seed(2)
    ids = torch.stack([with_image(40, nq, ids_, 5, rng), with_image(40, nq, ids_, 3, rng)])
    images = torch.randn(2, 3, 224, 224, generator=rng)
    with torch.no_grad():
        emb = model.embed(ids, images)
        feats = model.transformer.visual(images)
        wte = model.transformer.wte.weight
        torch.testing.assert_close(emb[0, 6:6 + nq], feats[0])
        torch.testing.assert_close(emb[1, 4:4 + nq], feats[1])
        for r, c in ((0, 5), (0, 6 + nq), (1, 3), (1, 4 + nq), (0, 0), (1, 39)):  # markers, text
            torch.testing.assert_close(emb[r, c], wte[ids[r, c]])
        base = model(ids, images)
        other = images.clone()
        other[1] = torch.randn(3, 224, 224, generator=rng)
        moved = model(ids, other)
    torch.testing.assert_close(base[0], moved[0], rtol=0, atol=0)
    torch.testing.assert_close(base[1, :4], moved[1, :4], rtol=0, atol=1e-6)
    assert (base[1, 4:] - moved[1, 4:]).abs().amax(-1).min() > 1e-4


def test_image_embedding_is_out_of_place_and_differentiable(tiny):
    cfg, _ = tiny
    model = ref.ReferenceQwenVL(cfg)
    model.load_state_dict(ref.random_hf_state_dict(cfg, seed=5))
    rng = torch.Generator().manual_seed(6)
    ids = with_image(30, model.n_queries, ref.image_token_ids(cfg), 2, rng)[None]
    before = model.transformer.wte.weight.detach().clone()
    model(ids, torch.randn(1, 3, 224, 224, generator=rng)).square().mean().backward()
    torch.testing.assert_close(model.transformer.wte.weight.detach(), before, rtol=0, atol=0)
    assert model.transformer.visual.conv1.weight.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_bad_image_inputs_are_rejected(tiny):
    cfg, model = tiny
    start, end, pad = ref.image_token_ids(cfg)
    ids = with_image(30, model.n_queries, (start, end, pad), 2, torch.Generator().manual_seed(0))[None]
    with pytest.raises(ValueError, match="1 <img> spans but 0 images"):
        model(ids)
    broken = ids.clone()
    broken[0, 3 + model.n_queries] = pad
    with pytest.raises(ValueError, match="row 0 position 2"):
        model(broken, torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="multiple of 14"):
        model(ids, torch.zeros(1, 3, 220, 220))


def test_vit_positions_as_is_at_224_and_bicubic_at_448(tiny):
    cfg, model = tiny
    vis = model.transformer.visual
    table = vis.positional_embedding.detach()
    assert ref.resize_positions(table, 256) is table
    big = ref.resize_positions(table, 1024)
    torch.testing.assert_close(big, numpy_resize(table, 1024), rtol=1e-5, atol=1e-6)
    nearest = table.reshape(16, 16, -1).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1024, -1)
    assert (big - nearest).abs().max() > 1e-3
    with torch.no_grad():  # conv1 has no bias: a black image leaves only the positions
        for size, positions in ((224, table), (448, numpy_resize(table, 1024))):
            got = vis.encode(torch.zeros(1, 3, size, size))
            torch.testing.assert_close(got[0], vis.run_blocks(vis.ln_pre(positions)[None])[0],
                                       rtol=1e-4, atol=1e-5)


def test_llm_mlp_gates_with_w2():
    mlp = ref._LLMMLP(1, 1)
    with torch.no_grad():
        mlp.w1.weight.fill_(2.0)
        mlp.w2.weight.fill_(3.0)
        mlp.c_proj.weight.fill_(1.0)
        got = mlp(torch.ones(1, 1, 1)).item()
    assert got == pytest.approx(2.0 * 3.0 * torch.sigmoid(torch.tensor(3.0)).item(), rel=1e-6)  # w1 * silu(w2)
