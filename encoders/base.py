"""The text-encoder base class and the masked operations every encoder shares.

Every encoder maps a padded batch of titles to one vector per title:
``forward(tokens[B, L] int64, mask[B, L] bool) -> [B, out_dim]``. Token 0 is padding; ``mask`` is
True on real words and False on padding, with the real words first (the loader left-aligns titles,
and the bi-LSTMs rely on it to pack sequences).

An empty title (an all-padding row) is legal: the pooled vector of such a row is all zeros, so the
encoder's output is its projection bias, and an attention row is all zeros. Nothing divides by zero
and nothing takes a softmax over nothing, so no encoder ever produces NaN for it.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from sicot_cli.errors import SicotError

log = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """Base class: owns the word embedding (row 0 is padding) and the output size.

    Subclasses build their layers after calling ``super().__init__`` and implement ``forward``.
    Encoders that weigh words also implement ``attention(tokens, mask) -> [B, L]`` and set
    ``has_attention = True``.

    Attributes:
        embedding: ``nn.Embedding`` initialised from the word vectors, ``padding_idx=0``.
        embed_dim: Width ``d`` of the word vectors.
        out_dim: Width of the encoder's output.
        has_attention: Whether the encoder exposes per-word weights through ``attention``.
    """

    has_attention: bool = False

    def __init__(self, vectors: torch.Tensor, out_dim: int, freeze_embeddings: bool = False) -> None:
        """Validate the common arguments and build the embedding.

        Args:
            vectors: Float tensor ``[V, d]`` of initial word vectors; row 0 is the padding word.
                They are copied (as float32), never modified.
            out_dim: Width of the output embedding (>= 1).
            freeze_embeddings: Keep the word vectors fixed during training.

        Raises:
            SicotError: ``vectors`` is not a 2-D floating tensor with at least one row and column,
                or ``out_dim`` is not a positive integer.
        """
        super().__init__()
        if not isinstance(vectors, torch.Tensor):
            raise SicotError(
                f"encoder option 'vectors' must be a 2-D float tensor [vocab, dim], got {type(vectors).__name__}"
            )
        if vectors.dim() != 2 or not vectors.is_floating_point():
            raise SicotError(
                f"encoder option 'vectors' must be a 2-D float tensor [vocab, dim], "
                f"got shape {tuple(vectors.shape)} of {vectors.dtype}"
            )
        if vectors.shape[0] < 1 or vectors.shape[1] < 1:
            raise SicotError(f"encoder option 'vectors' is empty: shape {tuple(vectors.shape)}")
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.embed_dim = int(vectors.shape[1])
        # A copy, so training never writes into the caller's word2vec matrix.
        self.embedding = nn.Embedding(vectors.shape[0], self.embed_dim, padding_idx=0)
        with torch.no_grad():
            self.embedding.weight.copy_(vectors.detach().to(torch.float32))
        self.embedding.weight.requires_grad_(not bool(freeze_embeddings))
        log.debug(
            "%s: %d word vectors of dim %d (%s), out_dim %d",
            type(self).__name__,
            vectors.shape[0],
            self.embed_dim,
            "frozen" if freeze_embeddings else "trainable",
            self.out_dim,
        )


MAX_WIDTH = 16384  # a width or rank above it is a typo, and its weights would not fit in memory


def check_positive_int(option: str, value: object, maximum: int = MAX_WIDTH) -> int:
    """Return ``value`` if it is an integer from 1 to ``maximum``, else raise a SicotError naming ``option``.

    Args:
        option: The option's name, as the user wrote it.
        value: The value to check; ``bool`` is refused although it is an ``int``.
        maximum: The largest value accepted (a size: its weights must fit in memory).

    Returns:
        The value as an ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        try:  # as the recipe writes it (true, {"a": 1}), not as Python does (True, {'a': 1})
            shown = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            shown = repr(value)
        raise SicotError(
            f"encoder option {option!r} (model.encoder_options.{option}) must be an integer from 1 to {maximum}, "
            f"got {shown}"
        )
    return value


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ``x[B, L, D]`` over the real positions of ``mask[B, L]``; an empty row gives zeros.

    Args:
        x: Values per position.
        mask: True on real positions.

    Returns:
        ``[B, D]`` means; all-zero rows where ``mask`` has no True.
    """
    weights = mask.to(x.dtype)
    # clamp(min=1) turns 0/0 into 0/1 for empty rows; the numerator is already 0 there.
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    return weighted_sum(weights, x)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores[B, L]`` over the real positions of ``mask``; exactly 0 on padding.

    A row with no real position gives all zeros (a plain ``-inf`` fill would give NaN there).

    Args:
        scores: Unnormalised scores.
        mask: True on real positions.

    Returns:
        ``[B, L]`` weights that sum to 1 over each non-empty row.
    """
    # The dtype's lowest finite value rather than -inf: exp underflows to exactly 0 on padding
    # next to any real word, and an all-padding row stays finite (uniform) until the mask zeroes it.
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def weighted_sum(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``sum_t weights[b, t] * x[b, t, :]`` as ``[B, D]``."""
    # Multiply-and-sum rather than bmm: B tiny [1, L] x [L, D] matmuls are ~1.5x slower on CPU
    # (forward+backward), and the [B, L, D] product is small.
    return (weights.unsqueeze(-1) * x).sum(dim=1)
