"""Flax GPT-2, BERT and LLaMA that match Hugging Face, and their weight loading.

>>> from puma import models
>>> m = models.load("gpt2-debug")            # or a HF folder, or a .gguf file
>>> logits, _ = m.module("exact").apply(m.variables(), input_ids)
"""

from puma.models.loading import FAMILIES, LoadedModel, load, presets

__all__ = ["FAMILIES", "LoadedModel", "load", "presets"]
