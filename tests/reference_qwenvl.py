"""Independent plain-PyTorch reference of the HF Qwen-VL forward pass (the tests' ground truth).

Written only from /work/shared/reference/qwen-vl.md (sections 1.1-1.4, 1.6): single process, fp32,
parameters named exactly like the HF state dict, so a checkpoint converted to Megatron and back can be
checked against it. Deliberately simple (explicit matmul attention, no fused kernels, no megatron
imports) so that it shares no code, and therefore no bugs, with the model under test.

Config keys beyond the HF config.json (used by tiny test configs only):
  visual.n_queries       adapter queries, a square number (HF hard-codes 256 = a 16x16 grid)
  visual.attn_pool_heads adapter heads; overrides HF's `output_dim // 128` (which is 0 for output_dim 64)
The ViT positional table always has 256 rows (a 16x16 grid), as in the HF release.
"""
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VIT_POS_ROWS = 256  # learned ViT table: a 16x16 grid whatever the image size
VIT_LN_EPS = 1e-6

_HF_7B = {
    "model_type": "qwen", "architectures": ["QWenLMHeadModel"],
    "hidden_size": 4096, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-6,
    "num_attention_heads": 32, "num_hidden_layers": 32, "max_position_embeddings": 8192,
    "seq_length": 2048, "no_bias": True, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "vocab_size": 151936, "tie_word_embeddings": False,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
               "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664},
}


def hf_config(**overrides) -> dict:
    """The Qwen-VL 7B config.json as a dict; `visual=` overrides are merged into the visual sub-dict."""
    cfg = copy.deepcopy(_HF_7B)
    visual = overrides.pop("visual", {})
    cfg.update(overrides)
    cfg["visual"].update(visual)
    return cfg


def tiny_hf_config(**overrides) -> dict:
    """A few-thousand-parameter Qwen-VL for CPU tests: same code paths, every size shrunk."""
    visual = {"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.0, "patch_size": 14,
              "image_size": 224, "output_dim": 64, "attn_pool_heads": 2, "n_queries": 16,
              "image_start_id": 125}
    visual.update(overrides.pop("visual", {}))
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                intermediate_size=2 * 96, vocab_size=128, max_position_embeddings=512, seq_length=256)
    base.update(overrides)
    return hf_config(visual=visual, **base)


def image_token_ids(cfg: dict) -> tuple:
    """(<img>, </img>, <imgpad>) ids: the two ids after `image_start_id`, as in the Qwen tokenizer."""
    start = cfg["visual"]["image_start_id"]
    return start, start + 1, start + 2


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} must be a square number of grid cells, got {n}")
    return side


def _derived(cfg: dict) -> dict:
    """Sizes the HF code derives from config.json; rejects configs this reference cannot represent."""
    v = cfg["visual"]
    if v["output_dim"] != cfg["hidden_size"]:
        raise ValueError(f"visual.output_dim {v['output_dim']} must equal hidden_size {cfg['hidden_size']}")
    if cfg.get("rotary_pct", 1.0) != 1.0 or cfg.get("tie_word_embeddings", False):
        raise ValueError("reference supports only rotary_pct 1.0 and untied embeddings")
    heads = v.get("attn_pool_heads", v["output_dim"] // 128)
    if heads < 1 or v["output_dim"] % heads:
        raise ValueError(f"adapter heads {heads} must be >= 1 and divide output_dim {v['output_dim']}; "
                         "set visual.attn_pool_heads for small output_dim")
    n_queries = v.get("n_queries", 256)
    _square_side(n_queries, "visual.n_queries")
    return {"proj": cfg["kv_channels"] * cfg["num_attention_heads"], "ffn": cfg["intermediate_size"] // 2,
            "vit_ffn": int(v["width"] * v["mlp_ratio"]), "pool_heads": heads, "n_queries": n_queries}


def hf_key_shapes(cfg: dict) -> dict:
    """Every HF state-dict key with its shape (section 1.6), without allocating anything."""
    d, v = _derived(cfg), cfg["visual"]
    h, vocab, w, out = cfg["hidden_size"], cfg["vocab_size"], v["width"], v["output_dim"]
    shapes = {"transformer.wte.weight": (vocab, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (h,), p + "ln_2.weight": (h,),
                       p + "attn.c_attn.weight": (3 * d["proj"], h), p + "attn.c_attn.bias": (3 * d["proj"],),
                       p + "attn.c_proj.weight": (h, d["proj"]), p + "mlp.w1.weight": (d["ffn"], h),
                       p + "mlp.w2.weight": (d["ffn"], h), p + "mlp.c_proj.weight": (h, d["ffn"])})
    p = "transformer.visual."
    shapes.update({p + "conv1.weight": (w, 3, v["patch_size"], v["patch_size"]),
                   p + "positional_embedding": (VIT_POS_ROWS, w),
                   p + "ln_pre.weight": (w,), p + "ln_pre.bias": (w,)})
    for j in range(v["layers"]):
        b = f"{p}transformer.resblocks.{j}."
        for ln in ("ln_1", "ln_2"):
            shapes.update({f"{b}{ln}.weight": (w,), f"{b}{ln}.bias": (w,)})
        for name, (o, i) in {"attn.in_proj": (3 * w, w), "attn.out_proj": (w, w),
                             "mlp.c_fc": (d["vit_ffn"], w), "mlp.c_proj": (w, d["vit_ffn"])}.items():
            shapes.update({f"{b}{name}.weight": (o, i), f"{b}{name}.bias": (o,)})
    a = p + "attn_pool."
    shapes.update({a + "query": (d["n_queries"], out), a + "pos_embed": (d["n_queries"], out),
                   a + "kv_proj.weight": (out, w), a + "attn.in_proj_weight": (3 * out, out),
                   a + "attn.in_proj_bias": (3 * out,), a + "attn.out_proj.weight": (out, out),
                   a + "attn.out_proj.bias": (out,)})
    for ln in ("ln_q", "ln_kv"):
        shapes.update({f"{a}{ln}.weight": (out,), f"{a}{ln}.bias": (out,)})
    shapes.update({p + "ln_post.weight": (out,), p + "ln_post.bias": (out,), p + "proj": (out, out)})
    return shapes


def param_counts(cfg: dict) -> dict:
    """Parameters per part. `transformer.visual.attn_pool.*` is the adapter; the rest of `visual`
    (ln_post and proj included) is the ViT: the grouping that gives the paper's 1.9B / 0.08B / 7.7B."""
    counts = {"vit": 0, "adapter": 0, "llm": 0}
    for key, shape in hf_key_shapes(cfg).items():
        part = ("adapter" if key.startswith("transformer.visual.attn_pool.") else
                "vit" if key.startswith("transformer.visual.") else "llm")
        counts[part] += math.prod(shape)
    return counts


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Standard 1D table: [sin(p * w_i) | cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed adapter positions for a grid x grid image, row-major cells. First half of the channels
    is the 1D table of the column index, second half that of the row index (the MAE/HF order)."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


def resize_positions(table: torch.Tensor, n_cells: int) -> torch.Tensor:
    """A square [g*g, d] table at n_cells = g'*g' cells: used as is when g == g', otherwise
    bicubic-resized (align_corners=False) in fp32, as HF does on every forward."""
    src, dst = _square_side(table.shape[0], "position table rows"), _square_side(n_cells, "patch count")
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(table.dtype)


def attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(d)) v on [b, heads, s, d] tensors, explicit and in fp32."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s_q, s_k = scores.shape[-2:]
        future = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def _heads(x, n):  # [b, s, n*d] -> [b, n, s, d]
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _merge(x):  # [b, n, s, d] -> [b, s, n*d]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, cast back, then scale (HF order)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x, base):
    """Rotate-half RoPE over the full head dim of x [b, heads, s, d] at positions 0..s-1."""
    d, s = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _LLMAttention(nn.Module):
    def __init__(self, cfg, proj):
        super().__init__()
        self.heads, self.base = cfg["num_attention_heads"], cfg["rotary_emb_base"]
        self.c_attn = nn.Linear(cfg["hidden_size"], 3 * proj, bias=True)
        self.c_proj = nn.Linear(proj, cfg["hidden_size"], bias=False)

    def forward(self, x):
        q, k, v = (_heads(t, self.heads) for t in self.c_attn(x).chunk(3, dim=-1))  # blocked Q|K|V
        q, k = rotary(q, self.base), rotary(k, self.base)
        return self.c_proj(_merge(attention(q, k, v, causal=True)))


class _LLMMLP(nn.Module):
    def __init__(self, h, ffn):
        super().__init__()
        self.w1, self.w2 = nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False)
        self.c_proj = nn.Linear(ffn, h, bias=False)

    def forward(self, x):  # w2 is the SiLU gate, w1 the up projection
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class _LLMBlock(nn.Module):
    def __init__(self, cfg, d):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["layer_norm_epsilon"]
        self.ln_1, self.attn = RMSNorm(h, eps), _LLMAttention(cfg, d["proj"])
        self.ln_2, self.mlp = RMSNorm(h, eps), _LLMMLP(h, d["ffn"])

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ViTAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj, self.out_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):  # in_proj outputs are per head [q_h | k_h | v_h]
        qkv = _heads(self.in_proj(x), self.heads)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.out_proj(_merge(attention(q, k, v)))


class _ViTBlock(nn.Module):
    def __init__(self, width, heads, ffn):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width, eps=VIT_LN_EPS), _ViTAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=VIT_LN_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, ffn))
        self.mlp.add_module("gelu", nn.GELU())  # exact (erf) GELU
        self.mlp.add_module("c_proj", nn.Linear(ffn, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def cross_attention(q, k, v, in_w, in_b, out_w, out_b, heads):
    """torch.nn.MultiheadAttention semantics on [b, s, d] inputs with a blocked [Wq; Wk; Wv] in_proj."""
    (wq, wk, wv), (bq, bk, bv) = in_w.chunk(3), in_b.chunk(3)
    q, k, v = (_heads(F.linear(t, w, b), heads) for t, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv)))
    return F.linear(_merge(attention(q, k, v)), out_w, out_b)


class _Resampler(nn.Module):
    """Position-aware adapter: n_queries learned queries cross-attend to the ViT tokens."""

    def __init__(self, width, out, n_queries, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(n_queries, out))
        self.register_buffer("pos_embed", sincos_2d(out, _square_side(n_queries, "n_queries")))
        self.kv_proj = nn.Linear(width, out, bias=False)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.zeros(3 * out, out))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * out))
        self.attn.out_proj = nn.Linear(out, out)
        self.ln_q, self.ln_kv = nn.LayerNorm(out, eps=VIT_LN_EPS), nn.LayerNorm(out, eps=VIT_LN_EPS)

    def forward(self, x):  # x [n, patches, width] -> [n, n_queries, out]
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        k = kv + resize_positions(self.pos_embed, x.shape[1])  # positions on q and k, not on v
        a = self.attn
        return cross_attention(q, k, kv, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                               a.out_proj.bias, self.heads)


class _Visual(nn.Module):
    def __init__(self, cfg, d):
        super().__init__()
        v = cfg["visual"]
        w, out, self.patch = v["width"], v["output_dim"], v["patch_size"]
        self.conv1 = nn.Conv2d(3, w, kernel_size=self.patch, stride=self.patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(VIT_POS_ROWS, w))
        self.ln_pre = nn.LayerNorm(w, eps=VIT_LN_EPS)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            _ViTBlock(w, v["heads"], d["vit_ffn"]) for _ in range(v["layers"]))
        self.attn_pool = _Resampler(w, out, d["n_queries"], d["pool_heads"])
        self.ln_post = nn.LayerNorm(out, eps=VIT_LN_EPS)
        self.proj = nn.Parameter(torch.zeros(out, out))

    def encode(self, images):
        """ViT tokens [n, patches, width] (before the adapter)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] \
                or images.shape[2] % self.patch:
            raise ValueError(f"images must be [n, 3, H, H] with H a multiple of {self.patch}, "
                             f"got {tuple(images.shape)}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # no class token
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        return self.run_blocks(x)

    def run_blocks(self, x):
        for block in self.transformer.resblocks:
            x = block(x)
        return x

    def forward(self, images):  # -> [n, n_queries, output_dim]
        return self.ln_post(self.attn_pool(self.encode(images))) @ self.proj


class ReferenceQwenVL(nn.Module):
    """HF Qwen-VL forward: logits [b, s, vocab] from token ids and the images of the `<img>` spans."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = _derived(cfg)
        self.cfg, self.n_queries = cfg, d["n_queries"]
        self.img_start, self.img_end, _ = image_token_ids(cfg)
        h = cfg["hidden_size"]
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg["vocab_size"], h)
        self.transformer.h = nn.ModuleList(_LLMBlock(cfg, d) for _ in range(cfg["num_hidden_layers"]))
        self.transformer.ln_f = RMSNorm(h, cfg["layer_norm_epsilon"])
        self.transformer.visual = _Visual(cfg, d)
        self.lm_head = nn.Linear(h, cfg["vocab_size"], bias=False)

    def image_spans(self, input_ids):
        """(row, first position) of each image's n_queries slots, row-major; checks the markers."""
        rows, cols = (input_ids == self.img_start).nonzero(as_tuple=True)
        spans = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            end = c + self.n_queries + 1
            if end >= input_ids.shape[1] or input_ids[r, end] != self.img_end:
                raise ValueError(f"<img> at row {r} position {c} is not followed by {self.n_queries} "
                                 f"slots and </img> (id {self.img_end}) at position {end}")
            spans.append((r, c + 1))
        return spans

    def embed(self, input_ids, images=None):
        """Token embeddings with each image's adapter output written (out of place) into its span."""
        x = self.transformer.wte(input_ids)
        spans = self.image_spans(input_ids)
        n_images = 0 if images is None else images.shape[0]
        if len(spans) != n_images:
            raise ValueError(f"input_ids hold {len(spans)} <img> spans but {n_images} images were given")
        if not spans:
            return x
        feats = self.transformer.visual(images.float())
        rows = torch.tensor([r for r, _ in spans]).repeat_interleave(self.n_queries)
        cols = torch.cat([torch.arange(c, c + self.n_queries) for _, c in spans])
        return x.index_put((rows, cols), feats.reshape(-1, feats.shape[-1]).to(x.dtype))

    def forward(self, input_ids, images=None):
        x = self.embed(input_ids, images)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x)).float()


def random_hf_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Random weights under every HF key: std 0.02, norm weights 1 +- noise, fixed sin-cos pos_embed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in hf_key_shapes(cfg).items():
        noise = torch.randn(shape, generator=g)
        is_norm = any(f"{n}." in key for n in ("ln_1", "ln_2", "ln_f", "ln_pre", "ln_q", "ln_kv", "ln_post"))
        if key.endswith("attn_pool.pos_embed"):
            out[key] = sincos_2d(shape[1], _square_side(shape[0], "n_queries"))
        elif is_norm and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * noise
        elif is_norm:
            out[key] = 0.1 * noise
        else:
            out[key] = 0.02 * noise
    return out
