"""``bilinear``: the paper's bilinear word attention network (SICoT, CIKM'20, §3.2, Fig. 5).

The paper: "A bilinear operation between the global context and all word embeddings is introduced
to generate a second order feature map. An average pooling operation and a nonlinear transformation
are then carried out above the feature map to output a word attention vector. A semantic embedding
of the entire side information is achieved by the weighted sum of the word attention vector and all
word embeddings at final." The global context is the average of the word embeddings ("we simply use
an average pooling operation to generate a global embedding ... instead of using a sequential
model"), so word order does not matter anywhere in this encoder.

The paper gives no equations; this module implements it as a low-rank factorised bilinear map (MLB,
Kim et al., "Hadamard Product for Low-rank Bilinear Pooling", ICLR 2017). For a title with word
vectors ``w_1..w_n`` (``d`` wide) and rank ``r``:

    g     = (1/n) sum_t w_t                          global context (masked mean)
    f_t   = tanh(U g + b_u) * tanh(V w_t + b_v)      second-order feature map, r channels per word
    s_t   = tau * mean_r f_t                         average pooling over the channels
    a     = softmax over the real words of s         the nonlinearity -> word attention vector
    e     = sum_t a_t w_t                            semantic embedding (weighted sum)
    out   = P e + b                                  projected to out_dim

Why the tanh sits on each factor, before the pooling: without it the mean over channels is
``(1/r) sum_i (U g)_i (V w_t)_i = g^T (U^T V / r) w_t``, a single d x d bilinear form, so the r
"channels" would collapse into one matrix and the average pooling would add nothing. (The same
holds for a plain mean over k full bilinear channels ``g^T W_c w_t``, which equals
``g^T (mean_c W_c) w_t``; that degenerate variant is deliberately not implemented.) With the
per-channel nonlinearity each channel is a separate gated interaction and the average of them is
not expressible as one bilinear form.

``tau`` is a learnable temperature initialised to ``sqrt(r)`` (so at start ``s_t`` is the scaled
dot product ``tanh(U g) . tanh(V w_t) / sqrt(r)``): a mean of products of tanh values lies in
[-1, 1], and a softmax over scores confined there could never weigh one word more than e^2 (about
7.4) times another. ``U`` and ``V`` are initialised from N(0, 1 / (d * m)), with ``m`` the mean
square entry of the given word vectors, so that ``V w_t`` has roughly unit variance per channel
whatever the scale of the word2vec vectors: the tanh units start neither saturated nor linear, and
the attention starts close to uniform (close to the ``mean`` encoder) and learns to sharpen.

Cost: one ``[B*L, d] x [d, r]`` matmul for the word factors plus element-wise products and sums
over ``[B, L, r]`` and ``[B, L, d]``; no per-word ``nn.Bilinear`` (which is 25-300x slower). The
default rank is 128 (an option).

An empty title (all padding) has a zero global context, an all-zero attention row (the masked
softmax gives zeros where there is no word), a zero semantic embedding and therefore the
projection bias ``b`` as output.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from encoders.base import TextEncoder, check_positive_int, masked_mean, masked_softmax, weighted_sum
from encoders.registry import register_encoder

log = logging.getLogger(__name__)

# 128 channels: the feature map is pooled to one scalar per word anyway; rank 256 measured about
# 2.3x `mean` per training step on a 2-core CPU against about 1.8x for 128 (benchmarks/encoders.py).
DEFAULT_RANK = 128


class BilinearAttentionEncoder(TextEncoder):
    """Bilinear word attention (low-rank factorised) pooling of word vectors, then projection.

    Attributes:
        rank: Number of channels ``r`` of the second-order feature map.
        context_factor: ``U``, maps the global context to ``r`` channels.
        word_factor: ``V``, maps each word vector to ``r`` channels.
        temperature: Learnable scalar multiplying the channel average before the softmax.
        proj: ``P``, maps the semantic embedding to ``out_dim``.
    """

    has_attention = True

    def __init__(
        self,
        vectors: torch.Tensor,
        out_dim: int,
        freeze_embeddings: bool = False,
        rank: int = DEFAULT_RANK,
    ) -> None:
        super().__init__(vectors, out_dim, freeze_embeddings)
        self.rank = check_positive_int("rank", rank)
        self.context_factor = nn.Linear(self.embed_dim, self.rank)
        self.word_factor = nn.Linear(self.embed_dim, self.rank)
        self.temperature = nn.Parameter(torch.tensor(math.sqrt(self.rank)))
        self.proj = nn.Linear(self.embed_dim, self.out_dim)
        self._init_factors(vectors)

    @torch.no_grad()
    def _init_factors(self, vectors: torch.Tensor) -> None:
        # Row 0 is padding and often all zeros; leave it out of the scale estimate.
        words = vectors[1:] if vectors.shape[0] > 1 else vectors
        mean_square = float(words.detach().to(torch.float32).pow(2).mean())
        if not math.isfinite(mean_square) or mean_square <= 0.0:
            mean_square = 1.0
        std = 1.0 / math.sqrt(self.embed_dim * mean_square)
        for layer in (self.context_factor, self.word_factor):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        log.debug("bilinear attention: rank %d, factor init std %.3g", self.rank, std)

    def _attend(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, L]`` for embedded words ``[B, L, d]``."""
        context = torch.tanh(self.context_factor(masked_mean(words, mask)))  # [B, r]
        word_channels = torch.tanh(self.word_factor(words))  # [B, L, r]
        feature_map = context.unsqueeze(1) * word_channels  # [B, L, r], second order
        pooled = feature_map.mean(dim=-1)  # average pooling over the r channels
        return masked_softmax(self.temperature * pooled, mask)

    def attention(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-word attention weights ``[B, L]``: softmax over real words, 0 on padding.

        An empty title gives an all-zero row.
        """
        return self._attend(self.embedding(tokens), mask)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens[B, L]`` (``mask[B, L]`` True on words) into ``[B, out_dim]``."""
        words = self.embedding(tokens)
        return self.proj(weighted_sum(self._attend(words, mask), words))


@register_encoder
def bilinear(
    vectors: torch.Tensor,
    out_dim: int,
    freeze_embeddings: bool = False,
    rank: int = DEFAULT_RANK,
) -> BilinearAttentionEncoder:
    """Build the paper's bilinear word attention encoder (§3.2).

    Args:
        vectors: Float tensor ``[V, d]`` of initial word vectors; row 0 is padding.
        out_dim: Output width.
        freeze_embeddings: Keep the word vectors fixed.
        rank: Channels ``r`` of the low-rank bilinear feature map.

    Returns:
        The encoder.
    """
    return BilinearAttentionEncoder(vectors, out_dim, freeze_embeddings, rank)
