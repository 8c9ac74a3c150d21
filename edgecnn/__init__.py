"""edgecnn: small CNN classifiers from PyTorch training to edge runtimes."""

__version__ = "0.1.0"
