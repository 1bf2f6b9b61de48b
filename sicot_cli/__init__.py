"""sicot: side-information co-training (SICoT, CIKM'20) for long-tailed product recognition."""

__version__ = "0.1.0"
