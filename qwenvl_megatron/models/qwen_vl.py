"""Qwen-VL: ViT -> adapter -> image embeddings spliced into the token embeddings -> Qwen LLM.

Pipeline layout: the first stage holds the ViT, the adapter and the token embedding (plus its share of
decoder layers); later stages hold decoder layers only; the last also holds the head and the loss.
"""
from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ..runtime.layer_impl import backend_provider
from .adapter import VisionLanguageAdapter
from .config import QwenVLConfig
from .language import QwenLanguageModel
from .parallel import ParallelPlan
from .specs import adapter_spec, transformer_layer_spec
from .vision import VisionTransformer


class ImageSpanError(ValueError):
    """The token sequence and the images do not fit together."""


def splice_image_features(embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                          image_start_id: int, image_end_id: int) -> torch.Tensor:
    """Return a copy of `embeddings` [s, b, h] whose `Q` rows after each `<img>` are the image features
    [n, Q, h] in order (row-major over the batch). `<img>`/`</img>` keep their own embeddings.

    Out of place: writing into the embedding output in place would alias the embedding table's graph.
    """
    n, q, h = features.shape
    b_idx, starts = (input_ids == image_start_id).nonzero(as_tuple=True)  # row-major order
    if starts.numel() != n:
        raise ImageSpanError(f"{starts.numel()} <img> spans in the batch but {n} images were given")
    if n == 0:
        return embeddings
    seq = input_ids.shape[1]
    ends = starts + q + 1
    pos = starts.unsqueeze(1) + 1 + torch.arange(q, device=starts.device)  # [n, Q]
    inner = input_ids[b_idx.unsqueeze(1), pos.clamp(max=seq - 1)]
    if ((ends >= seq).any() or (input_ids[b_idx, ends.clamp(max=seq - 1)] != image_end_id).any()
            or ((inner == image_end_id) | (inner == image_start_id)).any()):
        raise ImageSpanError(f"every <img> must be followed by exactly {q} image positions and </img> "
                             f"(the adapter's query count, --num-image-tokens)")
    flat_rows = (pos * input_ids.shape[0] + b_idx.unsqueeze(1)).reshape(-1)  # row index in [s*b, h]
    flat = embeddings.reshape(-1, h).index_put((flat_rows,), features.reshape(-1, h).to(embeddings.dtype))
    return flat.reshape(embeddings.shape)


class QwenVLModel(MegatronModule):
    def __init__(self, cfg: QwenVLConfig, plan: ParallelPlan, pre_process: bool = True,
                 post_process: bool = True):
        plan.validate(cfg)
        llm_config = plan.llm_config(cfg)
        super().__init__(config=llm_config)
        self.cfg, self.plan = cfg, plan
        self.share_embeddings_and_output_weights = False  # Qwen's LM head is untied (megatron asks)
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules ask
        self.pre_process, self.post_process = pre_process, post_process
        backend = backend_provider(plan.impl)
        if pre_process:
            vit_config = plan.vit_config(cfg)
            self.vision = VisionTransformer(cfg.vit, vit_config, transformer_layer_spec(backend, rms_norm=False, causal=False),
                                            backend.layer_norm(rms_norm=False, for_qk=False))
            self.adapter = VisionLanguageAdapter(cfg.adapter, cfg.vit.width, plan.adapter_config(cfg),
                                                 adapter_spec(backend), recompute="adapter" in plan.recompute)
        self.language = QwenLanguageModel(cfg.llm, llm_config, transformer_layer_spec(backend, rms_norm=True, causal=True),
                                          pre_process=pre_process, post_process=post_process,
                                          packed_thd=plan.impl == "te")

    def set_input_tensor(self, tensor):
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self.language.set_input_tensor(tensor)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, Q, hidden]"""
        return self.adapter(self.vision(images))

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, inference_context=None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s]; images [n, 3, H, W] for the n `<img>` spans (row-major); targets [b, s] the
        next-token ids (-100: no loss). See QwenLanguageModel.forward for what comes back;
        `inference_context` is the KV cache of generation (qwenvl_megatron.inference); `position_ids`
        [b, s] mark the samples of packed rows for per-sample attention (models/packed.py)."""
        decoder_input = None
        if self.pre_process:
            emb = self.language.embed_tokens(input_ids)
            if images is not None and images.shape[0] > 0:
                emb = splice_image_features(emb, input_ids, self.encode_images(images),
                                            self.cfg.image_start_id, self.cfg.image_end_id)
            else:
                if (input_ids == self.cfg.image_start_id).any():
                    raise ImageSpanError("the batch has <img> spans but no images were given")
                if torch.is_grad_enabled() and self.training:
                    # Text-only batch: keep the vision parameters in the graph (zero-weighted) so every
                    # data-parallel rank produces the same set of gradients.
                    size = self.cfg.vit.patch_size * self.cfg.adapter.grid
                    dummy = torch.zeros(1, 3, size, size, dtype=emb.dtype, device=emb.device)
                    emb = emb + 0.0 * self.encode_images(dummy).sum()
            decoder_input = emb
        return self.language(decoder_input, input_ids.shape[1], targets, inference_context=inference_context,
                             position_ids=position_ids)


def parameter_counts(model: QwenVLModel) -> dict[str, int]:
    """Elements per part as the HF layout groups them (`transformer.visual.*` except `attn_pool` is the
    ViT, so Qwen-VL's `ln_post`/`proj` count there; the vocabulary is counted unpadded). Counts this
    rank's tensors: build with TP1/PP1 (e.g. on the meta device) for whole-model numbers."""
    counts = {"vit": 0, "adapter": 0, "llm": 0}
    vocab = model.cfg.llm.vocab_size
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        n = t.numel()
        if name.startswith("language.") and ("word_embeddings" in name or "output_layer" in name):
            n = vocab * t.shape[1]
        if name.startswith("vision.") or name.startswith(("adapter.ln_post.", "adapter.proj")):
            counts["vit"] += n
        elif name.startswith("adapter."):
            counts["adapter"] += n
        else:
            counts["llm"] += n
    return counts
