"""Plaintext parity of the Flax models with transformers' PyTorch models on the same weights.

Oracle: ``transformers`` PyTorch classes (eager attention) loaded from the very checkpoint puma
loads. Tolerance: max absolute difference of logits / hidden states <= 1e-4 (float32; the models
are perturbed so activations are O(1), not the tiny values of a fresh init).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from puma import models, protocols, tasks  # noqa: E402
from puma.runtime.base import PlaintextSession  # noqa: E402
from tests.hf_reference import hf_model  # noqa: E402

ATOL = 1e-4


def _check(actual, expected, atol=ATOL, what="output"):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _left_padded_batch(vocab, lengths, seed=1):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    ids, mask = tasks.left_pad(seqs, max(lengths), 0)
    return seqs, ids, mask, tasks.positions_from_mask(mask)


def _reference_logits(hf, ids, mask, pos) -> np.ndarray:
    """transformers' logits for left-padded ``ids`` with their mask and positions."""
    with torch.no_grad():
        return hf(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits.numpy()


@pytest.mark.parametrize("preset", ["gpt2-debug", "llama-debug"])
def test_causal_lm_matches_transformers(preset, tmp_path):
    family, config = models.presets()[preset]
    hf = hf_model(family, config, tmp_path)
    loaded = models.load(str(tmp_path))
    assert loaded.family == family and loaded.config == config
    _, ids, mask, pos = _left_padded_batch(config.vocab_size, [7, 4])
    ref = _reference_logits(hf, ids, mask, pos)
    logits, _ = loaded.module().apply(loaded.variables(), ids, mask, pos)
    valid = mask.astype(bool)
    _check(np.asarray(logits)[valid], ref[valid], what=f"{preset} logits")


def test_llama_debug_has_gqa_and_untied_head(tmp_path):
    config = models.presets()["llama-debug"][1]
    assert config.num_key_value_heads < config.num_attention_heads and not config.tie_word_embeddings
    hf_model("llama", config, tmp_path)
    params = models.load(str(tmp_path)).params
    assert "lm_head" in params
    assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 2 * 8)


@pytest.mark.parametrize("preset", ["llama-debug", "qwen2-debug"])
def test_joined_projections_give_transformers_logits(preset, tmp_path):
    """The owner's side-by-side q/k/v and gate/up (with Qwen2's q/k/v biases) read by a set with
    fused projections: the same logits as transformers on the same checkpoint, and each joined
    tensor is its parts' columns in order."""
    from puma.models import loading

    family, config = models.presets()[preset]
    hf = hf_model(family, config, tmp_path)
    loaded = models.load(str(tmp_path), lazy=True)
    joined = loading.join_projections(loaded.lazy, loading.FAMILIES[family].joins)
    attn = "layers_1/self_attn/"
    assert {"qkv_proj/kernel", "q_proj/kernel"} & {n[len(attn) :] for n in joined.names()} == {"qkv_proj/kernel"}
    parts = [loaded.lazy.get(attn + f"{p}_proj/kernel") for p in "qkv"]
    np.testing.assert_array_equal(joined.get(attn + "qkv_proj/kernel"), np.concatenate(parts, axis=1))
    if config.qkv_bias:
        biases = [loaded.lazy.get(attn + f"{p}_proj/bias") for p in "qkv"]
        np.testing.assert_array_equal(joined.get(attn + "qkv_proj/bias"), np.concatenate(biases))
    assert joined.shapes == loading.joined_shapes(loaded.lazy.shapes, loading.FAMILIES[family].joins)
    _, ids, mask, pos = _left_padded_batch(config.vocab_size, [7, 4])
    ref = _reference_logits(hf, ids, mask, pos)
    fused = protocols.get("exact").with_plan(fused_projections=True)
    module = models.FAMILIES[family].module_cls(config, fused)
    logits, _ = module.apply({"params": joined.materialize()}, ids, mask, pos)
    valid = mask.astype(bool)
    _check(np.asarray(logits)[valid], ref[valid], what=f"{preset} logits on joined projections")


@pytest.mark.parametrize("preset", ["bert-debug", "bert-debug-cls"])
def test_bert_matches_transformers(preset, tmp_path):
    family, config = models.presets()[preset]
    hf = hf_model(family, config, tmp_path)
    loaded = models.load(str(tmp_path))
    rng = np.random.default_rng(2)
    ids = rng.integers(3, config.vocab_size, size=(2, 9)).astype(np.int32)
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    t = {
        k: torch.tensor(v, dtype=torch.long)
        for k, v in {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}.items()
    }
    module = loaded.module()
    with torch.no_grad():
        if config.has_classifier:
            ref_logits = hf(**t).logits.numpy()
            out = hf.bert(**t)
        else:
            out = hf(**t)
    hidden = module.apply(loaded.variables(), ids, mask, types, head="hidden")
    _check(hidden, out.last_hidden_state.numpy(), what="last hidden state")
    _check(module.apply(loaded.variables(), ids, mask, types, head="pooled"), out.pooler_output.numpy(), what="pooler")
    w = mask[..., None].astype(np.float64)
    mean_ref = (out.last_hidden_state.numpy() * w).sum(1) / w.sum(1)
    _check(module.apply(loaded.variables(), ids, mask, types, head="mean"), mean_ref, what="mean pooling")
    if config.has_classifier:
        _check(module.apply(loaded.variables(), ids, mask, types, head="classify"), ref_logits, what="classifier")


def test_minilm_sentence_embeddings_match_transformers(minilm_dir):
    loaded = models.load(minilm_dir)
    assert loaded.family == "bert" and loaded.config.hidden_size == 384
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog, twice."]
    ids, types, mask = tasks.encode_texts(loaded, texts)
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
            attention_mask=torch.tensor(mask),
        ).last_hidden_state.numpy()
    hidden = loaded.module().apply(loaded.variables(), ids, mask, types, head="hidden")
    valid = mask.astype(bool)
    _check(np.asarray(hidden)[valid], ref[valid], what="MiniLM hidden states")
    session = PlaintextSession()
    session.load_params(loaded.params)
    emb = tasks.embed(session, loaded, protocols.get("exact"), texts).outputs
    w = mask[..., None]
    ref_emb = tasks.normalize((ref * w).sum(1) / w.sum(1))
    _check(emb, ref_emb, what="MiniLM sentence embeddings")


def _hf_stories(path):
    import os

    folder, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    config.pad_token_id = None
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, config=config).eval()


def test_stories260k_gguf_matches_transformers(stories_gguf):
    loaded = models.load(stories_gguf)
    cfg = loaded.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (5, 8, 4)
    hf = _hf_stories(stories_gguf)
    _, ids, mask, pos = _left_padded_batch(cfg.vocab_size, [12, 5], seed=3)
    ref = _reference_logits(hf, ids, mask, pos)
    logits, _ = loaded.module().apply(loaded.variables(), ids, mask, pos)
    valid = mask.astype(bool)
    _check(np.asarray(logits)[valid], ref[valid], what="stories260K logits")


@pytest.mark.parametrize("preset", ["gpt2-debug", "llama-debug"])
def test_kv_cache_decoding_equals_full_recomputation(preset):
    loaded = models.load(preset)
    module = loaded.module()
    seqs, ids, mask, _ = _left_padded_batch(loaded.config.vocab_size, [6, 3], seed=4)
    extra = np.random.default_rng(5).integers(3, loaded.config.vocab_size, size=(2, 4)).astype(np.int32)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    full_pos = tasks.positions_from_mask(full_mask)
    ref, _ = module.apply(loaded.variables(), full_ids, full_mask, full_pos)

    slots = full_ids.shape[1]
    cache = module.init_cache(2, slots)
    prompt_len = ids.shape[1]
    logits, cache = module.apply(
        loaded.variables(), ids, full_mask, full_pos[:, :prompt_len], cache=cache, cache_index=0
    )
    steps = [logits]
    for k in range(extra.shape[1]):
        i = prompt_len + k
        logits, cache = module.apply(
            loaded.variables(), full_ids[:, i : i + 1], full_mask, full_pos[:, i : i + 1], cache=cache, cache_index=i
        )
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    # the last step's logits predict beyond the window; compare every position both computed
    valid = full_mask.astype(bool)
    _check(cached[:, :slots][valid], np.asarray(ref)[valid], atol=1e-5, what="cached vs full logits")


def test_lookups_beyond_the_limit_read_vocabulary_slices_or_position_groups(monkeypatch):
    """Past LOOKUP_ELEMENTS rows x entries, client-made one-hot rows are looked up in slices of
    the vocabulary (every table row read once) and secret ids in groups of positions; both give
    the table's rows exactly (oracle: numpy indexing); each slice is within the limit, each group
    as few positions as the limit allows (one, here)."""
    import dataclasses

    from puma.models import layers

    monkeypatch.setattr(layers, "LOOKUP_ELEMENTS", 64)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    ids = rng.integers(0, 50, (2, 7))
    onehot = np.eye(50, dtype=np.float32)[ids]  # [2, 7, 50]
    for name, x, want_calls in (("puma-fast", onehot, 13), ("puma", ids, 7)):
        calls = []
        ops = protocols.get(name)

        def embed(i, t, ops=ops):
            calls.append((i.shape, t.shape))
            return ops.embed(i, t)

        spied = dataclasses.replace(ops, embed=embed)
        got = layers.Embedding(50, 8).apply({"params": {"embedding": table}}, x, spied)
        np.testing.assert_allclose(np.asarray(got), table[ids], atol=1e-6, err_msg=name)
        assert len(calls) == want_calls, (name, calls)
        if x.ndim == 3:  # slices within the limit: their columns add up to the vocabulary, as the table rows do
            assert sum(i[-1] for i, _ in calls) == sum(t[0] for _, t in calls) == 50
            assert all(np.prod(i) <= 64 for i, _ in calls)
        else:  # one position of 2 rows x 50 entries is past the limit already: one position per group
            assert all(i == (2, 1) and t == (50, 8) for i, t in calls)
