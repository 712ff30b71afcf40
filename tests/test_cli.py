"""The CLI: greedy generation equals transformers' ``generate``, and bad input fails in one line.

Oracle for generation: ``transformers`` greedy ``generate`` on the same checkpoint (exact token
equality). Error cases check the exit status and that stderr is one ``puma: error:`` line that
names the problem.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from puma import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _check_error(capsys, argv, *fragments):
    code, out, err = _run(capsys, *argv)
    assert code != 0, f"{argv} succeeded"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("puma: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def gpt2_folder(tiny_gpt2):
    return tiny_gpt2


def test_generate_plaintext_matches_transformers_on_local_folder(capsys, gpt2_folder):
    path, hf = gpt2_folder
    code, out, _ = _run(capsys, "generate", "--model", str(path), "--prompt", "w5 w9 w17", "-n", "6", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["backend"] == "plaintext"
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert result["tokens"] == ref[0, 3:].tolist()


def test_generate_stories260k_matches_transformers(capsys, stories_gguf):
    code, out, _ = _run(
        capsys,
        "generate",
        "--model",
        stories_gguf,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "32",
        "--backend",
        "plaintext",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    folder, name = os.path.split(stories_gguf)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    config.pad_token_id = None
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, config=config).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    assert result["tokens"] == ref[0, ids.shape[1] :].tolist()
    assert result["text"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert result["text"].startswith(", there was a little girl named Lily.")


def test_embed_json(capsys, minilm_dir):
    code, out, _ = _run(capsys, "embed", "--model", minilm_dir, "A cat.", "A dog.", "--json")
    assert code == 0
    emb = np.array(json.loads(out)["embeddings"])
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_missing_path(capsys):
    _check_error(capsys, ["generate", "-m", "/no/such/model", "-p", "hi"], "/no/such/model", "not found")


def test_folder_without_config(capsys, tmp_path):
    _check_error(capsys, ["generate", "-m", str(tmp_path), "-p", "hi"], "no config.json")


def test_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    _check_error(capsys, ["generate", "-m", str(tmp_path), "-p", "hi"], "model_type 't5' is not supported")


def _edited_copy(src, dst, edit):
    """A copy of the HF folder ``src`` in ``dst`` with its tensors passed through ``edit``."""
    from safetensors.numpy import load_file, save_file

    for f in os.listdir(src):
        if f != "model.safetensors":
            (dst / f).write_bytes((src / f).read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def test_tensor_of_wrong_shape(capsys, tmp_path, gpt2_folder):
    def edit(tensors):
        tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)

    path = _edited_copy(gpt2_folder[0], tmp_path, edit)
    _check_error(capsys, ["generate", "-m", path, "-p", "w1"], "transformer.h.1.mlp.c_fc.weight", "(32, 100)")


def test_missing_tensor(capsys, tmp_path, gpt2_folder):
    path = _edited_copy(gpt2_folder[0], tmp_path, lambda tensors: tensors.pop("transformer.ln_f.bias"))
    _check_error(capsys, ["generate", "-m", path, "-p", "w1"], "transformer.ln_f.bias", "missing")


def test_prompt_longer_than_positions(capsys, gpt2_folder):
    path, _ = gpt2_folder
    prompt = " ".join(["w3"] * 70)  # gpt2-debug has 64 positions
    _check_error(capsys, ["generate", "-m", str(path), "-p", prompt, "-n", "1"], "exceeds the model's 64 positions")
    _check_error(capsys, ["generate", "-m", str(path), "-p", "w3 w4", "-n", "63"], "exceeds the model's 64 positions")


def test_empty_prompt(capsys, gpt2_folder):
    path, _ = gpt2_folder
    _check_error(capsys, ["generate", "-m", str(path), "-p", "   "], "empty prompt")


def test_preset_without_tokenizer(capsys):
    _check_error(capsys, ["embed", "-m", "gpt2-debug", "hello"], "no tokenizer")
