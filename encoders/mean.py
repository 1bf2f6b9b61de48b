"""``mean``: the average of a title's word vectors, projected to ``out_dim`` (the plain baseline).

Word order does not matter. An empty title averages to the zero vector, so its output is the
projection bias.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.base import TextEncoder, masked_mean
from encoders.registry import register_encoder


class MeanEncoder(TextEncoder):
    """Masked mean of the word vectors followed by a linear projection."""

    def __init__(self, vectors: torch.Tensor, out_dim: int, freeze_embeddings: bool = False) -> None:
        super().__init__(vectors, out_dim, freeze_embeddings)
        self.proj = nn.Linear(self.embed_dim, self.out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens[B, L]`` (``mask[B, L]`` True on words) into ``[B, out_dim]``."""
        return self.proj(masked_mean(self.embedding(tokens), mask))


@register_encoder
def mean(vectors: torch.Tensor, out_dim: int, freeze_embeddings: bool = False) -> MeanEncoder:
    """Build the mean-of-word-vectors encoder.

    Args:
        vectors: Float tensor ``[V, d]`` of initial word vectors; row 0 is padding.
        out_dim: Output width.
        freeze_embeddings: Keep the word vectors fixed.

    Returns:
        The encoder.
    """
    return MeanEncoder(vectors, out_dim, freeze_embeddings)
