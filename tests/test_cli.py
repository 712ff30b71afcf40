"""The CLI: greedy generation equals transformers' ``generate``, and bad input fails in one line.

Oracle for generation: ``transformers`` greedy ``generate`` on the same checkpoint (exact token
equality). Error cases check the exit status and that stderr is one ``puma: error:`` line that
names the problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys

import numpy as np
import pytest
import transformers

from puma import cli

#: Hang guard for a command run as a child process: it must end (or reach the point awaited)
#: within this many seconds; a guard against waiting forever, not a speed requirement.
HANG_GUARD_S = 180
#: MiniLM's plaintext embedding against transformers' (unit vectors): measured 5.5e-7.
EMBED_ATOL = 3e-6
#: bert-debug-cls logits under MPC (puma-fast) against plaintext puma-fast: measured 7.0e-5.
CLASSIFY_ATOL = 3e-4


def _torch():
    """PyTorch, for the tests whose oracle is transformers' PyTorch model (the test extra)."""
    return pytest.importorskip("torch", reason="the oracle is a PyTorch model: pip install -e '.[test]'")


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
def gpt2_folder(request):
    """gpt2-debug weights in a HF folder (saved by transformers' PyTorch model) and that model."""
    _torch()
    return request.getfixturevalue("tiny_gpt2")


def test_generate_plaintext_matches_transformers_on_local_folder(capsys, gpt2_folder):
    torch = _torch()
    path, hf = gpt2_folder
    code, out, _ = _run(
        capsys, "generate", "--model", str(path), "--prompt", "w5 w9 w17", "-n", "6", "--backend", "plaintext", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["backend"] == "plaintext"
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert result["tokens"] == ref[0, 3:].tolist()


def test_generate_stories260k_matches_transformers(capsys, stories_gguf):
    torch = _torch()
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
    """Plaintext embeddings equal transformers' PyTorch MiniLM, mean-pooled and L2-normalised
    (sentence-transformers' recipe): max |difference| within EMBED_ATOL (see there)."""
    torch = _torch()
    texts = ["A cat.", "A dog."]
    code, out, _ = _run(capsys, "embed", "--model", minilm_dir, *texts, "--backend", "plaintext", "--json")
    assert code == 0
    emb = np.array(json.loads(out)["embeddings"])
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(minilm_dir).eval()(**batch).last_hidden_state  # [2, T, 384]
    mask = batch["attention_mask"][..., None].float()
    pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    ref = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert emb.shape == ref.shape and np.max(np.abs(emb - ref)) <= EMBED_ATOL, np.max(np.abs(emb - ref))


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
    _check_error(capsys, ["generate", "-m", str(path), "-p", "   ", "--backend", "plaintext"], "empty prompt")


def test_preset_without_tokenizer(capsys):
    _check_error(capsys, ["embed", "-m", "gpt2-debug", "hello", "--backend", "plaintext"], "no tokenizer", "--ids")


# -- secure by default, text, one-line errors, --ids -------------------------------------------


def test_secure_by_default_and_says_what_ran(capsys):
    code, out, err = _run(capsys, "generate", "-m", "gpt2-debug", "--ids", "5,6,7", "-n", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["backend"] == "sim" and result["approx"] == "puma-fast" and result["stats"]["total_bytes_sent"] > 0
    code, out, err = _run(capsys, "generate", "-m", "gpt2-debug", "--ids", "5,6,7", "-n", "2")
    assert code == 0 and "puma: ran under MPC on sim (aby3/FM64/18), approximation set puma-fast" in err
    code, out, err = _run(capsys, "generate", "-m", "gpt2-debug", "--ids", "5,6,7", "-n", "2", "--backend", "plaintext")
    assert code == 0 and "puma: ran in plaintext (no MPC" in err and "approximation set exact" in err


def _check_usage_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("puma: error:"), err
    for fragment in fragments:
        assert fragment in err[0], f"{fragment!r} not in {err[0]!r}"


def test_bad_arguments_are_one_line(capsys):
    _check_usage_error(capsys, ["generate", "-m", "gpt2-debug", "-p", "x", "--approx", "nope"], "--approx", "puma-fast")
    _check_usage_error(capsys, ["generate", "-m", "gpt2-debug", "--ids", "5,x"], "not a comma-separated list")
    _check_usage_error(capsys, ["generate", "-m", "gpt2-debug", "--backend", "cloud", "-p", "x"], "sim")
    _check_usage_error(capsys, ["generate", "-m", "gpt2-debug"], "--prompt", "--ids")
    _check_usage_error(
        capsys, ["classify", "-m", "bert-debug-cls", "--ids", "2", "--batch-size", "0"], "whole number >= 1"
    )


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--temperature", "-1"], "--temperature must be > 0"),
        (["--top-k", "5"], "--top-k limits sampling, so it needs --temperature"),
        (["--temperature", "0.8", "--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_sampling_flags_are_checked(capsys, flags, fragment):
    _check_error(capsys, ["generate", "-m", "gpt2-debug", "--ids", "5,6", *flags], fragment)


def test_missing_model_lists_presets_and_aliases(capsys):
    _check_error(capsys, ["embed", "-m", "/no/such", "hi"], "not found", "gpt2-debug", "minilm")


def test_ids_run_every_task_on_presets(capsys):
    """Each task's --ids output is the API's: classify under MPC against plaintext puma-fast
    (logits within CLASSIFY_ATOL, measured 7.0e-5 on logits of 0.02, whose labels lead by 0.019),
    embed and generate in plaintext equal."""
    from puma.api import SecureModel

    ids = [[2, 7, 9, 4], [2, 8]]
    code, out, _ = _run(capsys, "classify", "-m", "bert-debug-cls", "--ids", "2,7,9,4", "--ids", "2,8", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["ids"] == ids and result["backend"] == "sim"
    plain = SecureModel.from_pretrained("bert-debug-cls", approx="puma-fast").classify(ids)
    assert np.max(np.abs(np.array(result["logits"]) - plain.outputs)) <= CLASSIFY_ATOL, result["logits"]
    assert result["labels"] == plain.labels
    code, out, _ = _run(capsys, "embed", "-m", "bert-debug", "--ids", "2,7,9", "--backend", "plaintext", "--json")
    want = SecureModel.from_pretrained("bert-debug").embed([[2, 7, 9]]).outputs
    assert code == 0 and np.allclose(json.loads(out)["embeddings"], want, atol=1e-6)
    code, out, _ = _run(capsys, "generate", "-m", "gpt2-debug", "--ids", "5,6,7", "-n", "3", "--backend", "plaintext")
    tokens = SecureModel.from_pretrained("gpt2-debug").generate_ids([[5, 6, 7]], 3).tokens[0]
    assert code == 0 and out.split("\n")[0] == "5,6,7 -> " + " ".join(map(str, tokens)), out
    _check_error(
        capsys, ["classify", "-m", "bert-debug-cls", "hi", "--ids", "2,3", "--backend", "plaintext"], "not both"
    )
    _check_error(capsys, ["classify", "-m", "bert-debug-cls", "--ids", "2,99999", "--backend", "plaintext"], "outside")


@pytest.mark.parametrize("prompts", [["The dog"], ["The dog", "Once upon a time"]])
def test_generated_text_reads_as_the_whole_sequence_decodes(capsys, stories_gguf, prompts):
    """SentencePiece: the continuation keeps the space of a leading ``▁was`` (batch and single)."""
    argv = ["generate", "-m", stories_gguf, "-n", "8", "--backend", "plaintext", "--json"]
    for p in prompts:
        argv += ["-p", p]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    folder, name = os.path.split(stories_gguf)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = result["text"] if len(prompts) > 1 else [result["text"]]
    tokens = result["tokens"] if len(prompts) > 1 else [result["tokens"]]
    for prompt, text, new in zip(prompts, texts, tokens):
        whole = tok.decode(tok(prompt).input_ids + new, skip_special_tokens=True)
        assert prompt + text == whole, (prompt, text, whole)
    assert texts[0].startswith(" ")  # "The dog" + " was ...", not "The dogwas"


def test_continuation_matches_byte_level_bpe_decode(shared_data):
    """GPT-2's byte-level BPE: text added after a prompt equals the whole decode minus the prompt's,
    also where one character's bytes span the prompt/continuation boundary."""
    from puma.tasks import continuation

    tok = transformers.AutoTokenizer.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    for text in ["The dog was a big, red one.", "Caf\u00e9 au lait \u2014 tr\u00e8s bien", "\U0001f600 smile"]:
        ids = tok(text).input_ids
        for cut in range(1, len(ids)):
            head, new = ids[:cut], ids[cut:]
            got = continuation(tok, head, new)
            whole, prefix = tok.decode(ids), tok.decode(head)
            if whole.startswith(prefix):
                assert prefix + got == whole, (text, cut)
            else:  # the prompt ends inside a character: the new ids decode alone
                assert got == tok.decode(new)


# -- registries: one table per extension point ----------------------------------------------


def test_extension_points_are_one_registry_entry_each(capsys, monkeypatch):
    """A throw-away backend, approximation set and model family, each added through its
    registry alone, appear in the CLI and run."""
    import dataclasses
    import sys
    import types

    from puma.models import gpt2, loading
    from puma.models.layers import Family
    from puma.protocols import exact

    from puma import protocols
    from puma.runtime import BACKENDS, Backend

    monkeypatch.setitem(BACKENDS, "threads", Backend("puma.runtime.sim", "sim under another name", in_process=True))
    module = types.ModuleType("puma.protocols.throwaway")
    module.OPS = dataclasses.replace(exact.OPS, name="throwaway")
    monkeypatch.setitem(sys.modules, "puma.protocols.throwaway", module)
    monkeypatch.setitem(protocols.REGISTRY, "throwaway", ("throwaway", "OPS"))
    tiny = gpt2.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=63, eos_token_id=63
    )
    family = Family(
        "tinygpt", gpt2.GPT2Config, gpt2.GPT2LMHeadModel, gpt2.HF_MAPPING, {"tinygpt-x": tiny}, "transformer."
    )
    monkeypatch.setitem(loading.FAMILIES, "tinygpt", family)

    help_text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "threads" in help_text and "throwaway" in help_text
    _check_error(capsys, ["generate", "-m", "/no/such", "-p", "x"], "tinygpt-x")
    code, out, err = _run(
        capsys,
        "generate",
        "-m",
        "tinygpt-x",
        "--ids",
        "5,6",
        "-n",
        "2",
        "--backend",
        "threads",
        "--approx",
        "throwaway",
    )
    assert code == 0, err
    assert "ran under MPC on threads" in err and "approximation set throwaway" in err
    assert len(out.split("->")[1].split()) == 2


def test_progress_lines_on_a_terminal_and_few_elsewhere(capsys, monkeypatch):
    argv = ["generate", "-m", "gpt2-debug", "--ids", "5,6", "-n", "1", "--approx", "puma"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _run(capsys, *argv)
    assert code == 0
    assert (
        "puma: loading gpt2-debug ..." in err
        and "puma: compiling gpt2_" in err
        and "for SPU (once per input shape)" in err
    ), err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0 and "compiling" not in err and json.loads(out)["tokens"]
    assert "puma: ran under MPC on sim" in err  # --json says on stderr what ran too
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    code, _, err = _run(capsys, *argv)
    assert code == 0 and "loading" not in err  # a short run into a file: no progress lines
    now = [0.0]
    lines = cli._ProgressLines(cli.QUIET_PROGRESS_S, clock=lambda: now[0])
    for t, message in ((1, "a"), (31, "b"), (40, "c"), (62, "d")):
        now[0] = t
        lines.emit(logging.LogRecord("puma.progress", logging.INFO, "", 0, message, (), None))
    assert capsys.readouterr().err.split() == ["puma:", "b", "...", "puma:", "d", "..."]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, on purpose
def test_a_signal_a_finaliser_swallows_still_stops_the_next_program():
    """Python drops a handler's exception raised inside a finaliser ("Exception ignored"; Ray's
    object references run finalisers all the time): the signal is remembered, and the next
    program run, or the command's return, raises it again."""
    from puma import interrupts
    from puma.program import Program
    from puma.runtime.base import PlaintextSession

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__

    session = PlaintextSession()
    program = Program("identity", lambda p, st, sec, pub: ({"y": sec["x"]}, {}), key=("identity",))
    previous = interrupts.install()
    try:
        Finalised()  # dropped at once: its KeyboardInterrupt is printed and ignored
        with pytest.raises(KeyboardInterrupt):
            session.run(program, {"x": np.ones(2, np.float32)})
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        interrupts.restore(previous)
    interrupts.check()  # restored: nothing remembered
    assert session.run(program, {"x": np.ones(2, np.float32)})["y"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "backend, signum, status, line",
    [
        ("sim", signal.SIGTERM, 143, "terminated (SIGTERM); sessions closed"),
        ("ray", signal.SIGTERM, 143, "terminated (SIGTERM); sessions closed"),
        ("ray", signal.SIGINT, 130, "interrupted"),
    ],
)
def test_a_signal_ends_a_run_within_seconds_with_one_line(tmp_path, backend, signum, status, line):
    """SIGTERM or Ctrl-C mid-run: one line and the signal's status within seconds, and every
    process the run started (Ray's daemons and actors on ``ray``) gone. Ray's own SIGTERM
    handler (exit 15, installed by ``ray.init``) must not replace the command's."""
    import subprocess
    import time

    from tests.parties import alive, descendants, wait_gone

    err_path = tmp_path / "err"
    programs = tmp_path / "cache" / "programs"  # a compile cache of its own: its first program marks the run
    env = dict(os.environ, PUMA_CACHE=str(tmp_path / "cache"), PUMA_COMPILE_CACHE="1")
    argv = [sys.executable, "-m", "puma.cli", "generate", "-m", "llama-debug", "--ids", "5,6,7", "-n", "60"]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [*argv, "--no-cache", "--backend", backend], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
    started = []
    try:
        deadline = time.monotonic() + HANG_GUARD_S  # imports, Ray's start, sharing, compiling
        while not list(programs.glob("*.pphlo")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and list(programs.glob("*.pphlo")), err_path.read_text()[-500:]
        started = descendants(proc.pid)
        proc.send_signal(signum)
        assert proc.wait(HANG_GUARD_S) == status  # a hang guard: the run ends within seconds
        lines = [ln for ln in err_path.read_text().splitlines() if ln.startswith("puma: error:")]
        assert lines == [f"puma: error: {line}"], err_path.read_text()[-500:]
        assert wait_gone(started) == [], "processes outlived the run"
    finally:  # whatever failed above: no run, Ray daemon or actor left behind
        if proc.poll() is None:
            started = [*started, *descendants(proc.pid)]
            proc.kill()
            proc.wait(10)
        for pid in alive(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
