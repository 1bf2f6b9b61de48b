"""``bilstm``: a bidirectional LSTM over the word vectors, masked mean pooling, projection.

The sequential baseline the paper argues against (§3.2: word order "is less important and even
harmful" on noisy titles); it is here so that claim can be measured. Sequences are packed with
``pack_padded_sequence``, so padding never enters the recurrence and appending pad tokens does not
change the output. Packing needs lengths >= 1: an empty title is packed with length 1 (it reads
the padding word once) and its outputs are then masked away, so its pooled vector is zero and its
output is the projection bias.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from encoders.base import TextEncoder, check_positive_int, masked_mean
from encoders.registry import register_encoder


class BiLSTMEncoder(TextEncoder):
    """Bi-LSTM word states, masked mean pooling over the real words, linear projection.

    Attributes:
        hidden_size: Hidden width per direction; word states are ``2 * hidden_size`` wide.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        out_dim: int,
        freeze_embeddings: bool = False,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__(vectors, out_dim, freeze_embeddings)
        self.hidden_size = self.embed_dim if hidden_size is None else check_positive_int("hidden_size", hidden_size)
        self.lstm = nn.LSTM(self.embed_dim, self.hidden_size, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * self.hidden_size, self.out_dim)

    def word_states(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the bi-LSTM over each title's real words.

        Args:
            tokens: ``[B, L]`` word ids.
            mask: ``[B, L]`` True on real words, which come first in each row.

        Returns:
            ``[B, L, 2 * hidden_size]`` states, zero on padding.
        """
        lengths = mask.sum(dim=1)
        packed = pack_padded_sequence(
            self.embedding(tokens),
            lengths.clamp(min=1).cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        states, _ = self.lstm(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=tokens.shape[1])
        # Only the empty titles (packed with length 1) have a non-zero state on a padding slot.
        return states * mask.unsqueeze(-1).to(states.dtype)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens[B, L]`` (``mask[B, L]`` True on words) into ``[B, out_dim]``."""
        return self.proj(masked_mean(self.word_states(tokens, mask), mask))


@register_encoder
def bilstm(
    vectors: torch.Tensor,
    out_dim: int,
    freeze_embeddings: bool = False,
    hidden_size: int | None = None,
) -> BiLSTMEncoder:
    """Build the bi-LSTM encoder with mean pooling.

    Args:
        vectors: Float tensor ``[V, d]`` of initial word vectors; row 0 is padding.
        out_dim: Output width.
        freeze_embeddings: Keep the word vectors fixed.
        hidden_size: LSTM width per direction (default: ``d``).

    Returns:
        The encoder.
    """
    return BiLSTMEncoder(vectors, out_dim, freeze_embeddings, hidden_size)
