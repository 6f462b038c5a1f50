"""The Qwen-7B language model on megatron-core: embedding, decoder stack, untied LM head, loss.

Pipeline-aware through `pre_process` (holds the embedding) and `post_process` (final norm, head, loss).
The vocabulary is padded for tensor parallelism (megatron's rule); the padded logits are masked to the
lowest float so the softmax, the loss and anything a user sees equal the unpadded model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from . import packed
from .config import LLMConfig
from .parallel import padded_vocab_size

IGNORE_INDEX = -100


class QwenLanguageModel(MegatronModule):
    def __init__(self, llm: LLMConfig, config: TransformerConfig, layer_spec: ModuleSpec,
                 pre_process: bool = True, post_process: bool = True, packed_thd: bool = False):
        super().__init__(config=config)
        self.llm = llm
        self.packed_thd = packed_thd  # per-sample packed attention through TE's THD format (models/packed.py)
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = llm.vocab_size
        self.padded_vocab_size = padded_vocab_size(llm.vocab_size, config.tensor_model_parallel_size)
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, vocab_size=self.padded_vocab_size,
                                                    max_sequence_length=llm.max_position_embeddings,
                                                    position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=llm.kv_channels, rotary_percent=1.0,
                                              rotary_interleaved=False, rotary_base=llm.rotary_base,
                                              use_cpu_initialization=False)  # on the device, not the CPU
        self.decoder = TransformerBlock(config, layer_spec, pre_process=pre_process, post_process=post_process)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False)

    def set_input_tensor(self, tensor):
        self.decoder.set_input_tensor(tensor)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [s, b, h] word embeddings (full sequence; sequence-parallel scatter comes later)."""
        return self.embedding.word_embeddings(input_ids).transpose(0, 1).contiguous()

    def forward(self, decoder_input: torch.Tensor | None, seq_length: int,
                targets: torch.Tensor | None = None, inference_context=None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input [s, b, h] on the first stage (None elsewhere: the pipeline supplies it).

        Returns on the last stage the per-token loss [b, s] (0 where targets == -100) when targets are
        given, else logits [b, s, vocab] (unpadded, gathered over TP); elsewhere the hidden states.

        `inference_context` (megatron's StaticInferenceContext, generation only): the layers keep their
        keys/values in it and take positions from its `sequence_len_offset`, so the tokens given are the
        ones after the cached prefix; the caller advances the offset.

        `position_ids` [b, s] (packed rows, `--packed-attention per-sample`): positions restart at 0 with
        every sample, and each sample attends only to itself (models/packed.py). None: one causal sequence
        per row, positions 0..s-1.
        """
        if decoder_input is not None and self.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        if position_ids is not None:
            hidden = self._per_sample(decoder_input, seq_length, position_ids)
        elif inference_context is None:
            rotary = self.rotary_pos_emb(seq_length)
            hidden = self.decoder(decoder_input, attention_mask=None, rotary_pos_emb=rotary)
        else:  # megatron slices the table at the cached offset itself
            rotary = self.rotary_pos_emb(inference_context.max_sequence_length)
            hidden = self.decoder(decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                                  inference_context=inference_context)
        if not self.post_process:
            return hidden
        if targets is None:
            logits = self._logits(hidden)  # [s, b, v/tp]
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return full[..., : self.vocab_size].transpose(0, 1).contiguous()
        return self._per_token_loss(hidden, targets.transpose(0, 1)).transpose(0, 1).contiguous()

    def _per_sample(self, decoder_input, seq_length: int, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder with every sample of a packed row attending only to itself -> [s, b, h]."""
        if not self.packed_thd:  # local layers: explicit mask and per-token RoPE
            if self.config.apply_rope_fusion:
                raise ValueError("per-sample packed attention with local layers needs unfused RoPE "
                                 "(--no-rope-fusion) or Transformer Engine")
            rotary = packed.rotary_per_token(self.rotary_pos_emb(seq_length), position_ids)
            return self.decoder(decoder_input, attention_mask=packed.attention_mask(position_ids),
                                rotary_pos_emb=rotary)
        # Transformer Engine: the microbatch as one THD sequence with cumulative lengths. Pipeline stages
        # exchange [s, b, h], so the layout is changed on the way in and out of every stage.
        params = packed.packed_seq_params(position_ids)
        if decoder_input is not None:
            decoder_input = packed.to_thd(decoder_input)
        else:
            self.decoder.input_tensor = packed.to_thd(self.decoder.input_tensor)
        hidden = self.decoder(decoder_input, attention_mask=None, packed_seq_params=params,
                              rotary_pos_emb=self.rotary_pos_emb(params.max_seqlen_q))
        return packed.from_thd(hidden, position_ids.shape[0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return self._mask_padded_vocab(logits)

    def _per_token_loss(self, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[s, b] cross-entropy, 0 where t == -100.

        Only the supervised positions go through the LM head: a caption supervises a few tokens after
        hundreds of image and prompt tokens, and [s, b, vocab] fp32 logits are the largest activation of
        a step. Under sequence parallelism each rank holds a slice of the sequence and the head gathers
        it, so there every position goes through.
        """
        keep = t != IGNORE_INDEX
        if self.config.sequence_parallel:
            loss = tensor_parallel.vocab_parallel_cross_entropy(self._logits(hidden).float(), t.masked_fill(~keep, 0))
            return loss.masked_fill(~keep, 0.0)
        rows = keep.nonzero(as_tuple=True)
        logits = self._logits(hidden[rows].unsqueeze(1))  # [n, 1, v/tp]: megatron's linear layers want 3-D
        if self.config.tensor_model_parallel_size == 1:  # the whole vocabulary here: torch's fused loss
            # (megatron's vocab-parallel one, a Python autograd function, costs twice as much on a small model)
            picked = F.cross_entropy(logits.squeeze(1).float(), t[rows], reduction="none")
        else:
            picked = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), t[rows].unsqueeze(1)).squeeze(1)
        return torch.zeros(t.shape, dtype=picked.dtype, device=picked.device).index_put(rows, picked)

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.padded_vocab_size == self.vocab_size:
            return logits
        per_rank = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if start + per_rank <= self.vocab_size:
            return logits
        col = torch.arange(start, start + per_rank, device=logits.device)
        return logits.masked_fill(col >= self.vocab_size, torch.finfo(logits.dtype).min)
