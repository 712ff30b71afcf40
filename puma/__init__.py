"""puma: private Transformer inference with three-party secure computation on SPU.

>>> import puma
>>> m = puma.SecureModel.from_pretrained("minilm", approx="puma", backend="sim")
>>> m.embed(["a sentence"]).outputs
"""

__version__ = "0.1.0"
__all__ = ["SecureModel", "load", "__version__"]


def __getattr__(name):
    # imported on first use: importing puma itself stays cheap (no JAX, no SPU)
    if name == "SecureModel":
        from puma.api import SecureModel

        return SecureModel
    if name == "load":
        from puma.models import load

        return load
    raise AttributeError(f"module 'puma' has no attribute {name!r}")
