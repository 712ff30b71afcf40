"""puma: private Transformer inference with three-party secure computation on SPU."""

__version__ = "0.1.0"
