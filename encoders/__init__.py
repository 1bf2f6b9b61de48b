"""Text encoders behind one registry: ``mean``, ``bilstm``, ``bilstm_attention``, ``bilinear``.

Each module below registers its encoder when imported; the imports are explicit on purpose (no
directory scan). User encoders come from a plug-in module, see :func:`load_encoder_module`.
"""

from encoders import bilinear_attention, bilstm, bilstm_attention, mean  # noqa: F401 - registers
from encoders.base import TextEncoder
from encoders.registry import create_encoder, list_encoders, load_encoder_module, register_encoder

__all__ = [
    "TextEncoder",
    "create_encoder",
    "list_encoders",
    "load_encoder_module",
    "register_encoder",
]
