"""edgecnn: small CNN classifiers from PyTorch training to edge runtimes."""

__version__ = "0.1.0"

# In a source checkout, `edgecnn.runtimes` and `edgecnn.exporters` live in ../runtimes and ../exporters
# (installed under these names by setuptools' package-dir). Run from the checkout's root, Python imports
# this folder ahead of an installed (non-editable) edgecnn, so let the two sub-packages resolve to the
# checkout's folders beside it.
def _checkout_subpackages() -> None:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if (not os.path.isdir(os.path.join(here, "runtimes"))
            and os.path.isfile(os.path.join(root, "runtimes", "base.py"))
            and os.path.isfile(os.path.join(root, "exporters", "onnx.py"))
            and root not in __path__):
        __path__.append(root)


_checkout_subpackages()
del _checkout_subpackages
