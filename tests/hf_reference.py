"""Test helpers: Hugging Face PyTorch reference models and a tiny tokenizer, saved to folders."""

from __future__ import annotations


def hf_model(family: str, config, path, seed: int = 0, scale: float = 0.1):
    """A PyTorch HF model for ``config`` with perturbed random weights, saved as safetensors.

    Every parameter gets N(0, scale) noise on top of HF's init, so norms and biases are not the
    trivial 1/0 and activations are O(1).
    """
    import torch
    import transformers

    classes = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "gemma3": transformers.Gemma3ForCausalLM,
        "bert": transformers.BertForSequenceClassification
        if getattr(config, "has_classifier", False)
        else transformers.BertModel,
    }
    torch.manual_seed(seed)
    hf_config = config.to_hf()
    hf_config._attn_implementation = "eager"
    model = classes[family](hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(path, safe_serialization=True)
    return model


def tiny_tokenizer(path, vocab_size: int, eos_id: int):
    """A word-level tokenizer over words ``w0 .. w{vocab_size-1}`` saved in ``path``.

    ``w{eos_id}`` is the end-of-text token; text is split on whitespace.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="w0", eos_token=f"w{eos_id}", pad_token=f"w{eos_id}"
    )
    tok.save_pretrained(path)
    return tok
