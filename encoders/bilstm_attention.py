"""``bilstm_attention``: bi-LSTM word states pooled by additive self-attention.

The score of word t is ``v^T tanh(W h_t + b)`` over its bi-LSTM state ``h_t``; a masked softmax
over the real words turns scores into weights (they sum to 1 and are exactly 0 on padding), and the
title is the weighted sum of the states, projected to ``out_dim``. An empty title has all-zero
weights, a zero pooled vector and therefore the projection bias as output.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.base import check_positive_int, masked_softmax, weighted_sum
from encoders.bilstm import BiLSTMEncoder
from encoders.registry import register_encoder


class BiLSTMAttentionEncoder(BiLSTMEncoder):
    """Bi-LSTM word states, additive attention pooling, linear projection.

    Attributes:
        attention_dim: Width of the attention's hidden layer ``W``.
    """

    has_attention = True

    def __init__(
        self,
        vectors: torch.Tensor,
        out_dim: int,
        freeze_embeddings: bool = False,
        hidden_size: int | None = None,
        attention_dim: int | None = None,
    ) -> None:
        super().__init__(vectors, out_dim, freeze_embeddings, hidden_size)
        self.attention_dim = (
            self.hidden_size if attention_dim is None else check_positive_int("attention_dim", attention_dim)
        )
        self.att_hidden = nn.Linear(2 * self.hidden_size, self.attention_dim)
        # No bias on v: a constant added to every score cancels in the softmax.
        self.att_score = nn.Linear(self.attention_dim, 1, bias=False)

    def _weights(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.att_score(torch.tanh(self.att_hidden(states))).squeeze(-1)
        return masked_softmax(scores, mask)

    def attention(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-word attention weights ``[B, L]``: softmax over real words, 0 on padding.

        An empty title gives an all-zero row.
        """
        return self._weights(self.word_states(tokens, mask), mask)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens[B, L]`` (``mask[B, L]`` True on words) into ``[B, out_dim]``."""
        states = self.word_states(tokens, mask)
        return self.proj(weighted_sum(self._weights(states, mask), states))


@register_encoder
def bilstm_attention(
    vectors: torch.Tensor,
    out_dim: int,
    freeze_embeddings: bool = False,
    hidden_size: int | None = None,
    attention_dim: int | None = None,
) -> BiLSTMAttentionEncoder:
    """Build the bi-LSTM encoder with additive self-attention pooling.

    Args:
        vectors: Float tensor ``[V, d]`` of initial word vectors; row 0 is padding.
        out_dim: Output width.
        freeze_embeddings: Keep the word vectors fixed.
        hidden_size: LSTM width per direction (default: ``d``).
        attention_dim: Width of the attention's hidden layer (default: ``hidden_size``).

    Returns:
        The encoder.
    """
    return BiLSTMAttentionEncoder(vectors, out_dim, freeze_embeddings, hidden_size, attention_dim)
