"""Conversations of several turns (:mod:`puma.conversation`): the secret cache kept between turns.

Oracles: transformers' ``LlamaForCausalLM`` run on the whole conversation so far at once (its
last-position logits for every revealed row); the tokenizer's chat template rendering the whole
conversation; the same conversation with weights held stage by stage. The message of a later
turn is padded at its front and the cache widened between turns, so both are checked.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from puma import cli
from puma.api import SecureModel
from puma.errors import PumaError

#: Under SPU (sim, the exact set) against transformers in float32: fixed point's error, as
#: tests/test_runtime.py's FXP_ATOL (measured here: 1.6e-3 on llama-debug's logits).
FXP_ATOL = 2e-2
#: Plaintext (float32, jax) against transformers (float32, PyTorch), as tests/test_models.py
#: (measured here: 7.2e-7).
ATOL = 1e-4
#: Two messages whose greedy replies (3 tokens each) do not end the sequence, so the first
#: reply's last token goes into the second turn's step; their top two logits lie 0.078 and
#: 0.089 apart (transformers), far beyond FXP_ATOL.
FIRST, SECOND = [20, 21, 22, 23, 24, 25, 26], [12, 13, 3, 4, 20]


def _check(actual, expected, atol, what):
    err = float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    assert err <= atol, f"{what}: max |error| {err:.3g} > {atol}"


def _hf_last_logits(hf, ids) -> np.ndarray:
    torch = pytest.importorskip("torch", reason="the oracle is a PyTorch model: pip install -e '.[test]'")
    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0, -1].numpy()


def _check_turns(hf, turns, messages, eos: int, atol: float) -> None:
    """Every logit row a turn revealed equals transformers' on the conversation up to it."""
    context: list[int] = []
    for number, (turn, message) in enumerate(zip(turns, messages), start=1):
        context += message
        for j, row in enumerate(turn.logits):
            _check(row, _hf_last_logits(hf, context + turn.tokens[:j]), atol, f"turn {number}, reply token {j}")
        context += turn.tokens if turn.tokens[-1] != eos else turn.tokens[:-1]


@pytest.fixture(scope="module")
def sim_llama(tiny_llama_chat):
    with SecureModel.from_pretrained(str(tiny_llama_chat[0]), approx="exact", backend="sim") as m:
        yield m


def test_turns_under_mpc_continue_the_conversation_as_transformers_does(sim_llama, tiny_llama_chat):
    """Two turns of token ids under MPC: every revealed logit row equals transformers' on the
    whole conversation so far; the second message costs one step, not one per token."""
    with sim_llama.conversation(chat=False, reveal="logits", slot_bucket=8) as talk:
        turns = [talk.say_ids(FIRST, 3), talk.say_ids(SECOND, 3)]
        assert talk.slots == 24, "the second turn widens the cache (16 -> 24 slots)"
    eos = sim_llama.model.config.eos_token_id
    assert len(turns[0].tokens) == 3 and eos not in turns[0].tokens, turns[0].tokens
    assert turns[1].message_tokens == len(SECOND) + 1, "the first reply's last token goes in with the message"
    _check_turns(tiny_llama_chat[1], turns, [FIRST, SECOND], eos, FXP_ATOL)
    with pytest.raises(PumaError, match="conversation is closed"):
        talk.say_ids(SECOND, 1)
    message, decode = turns[1].step_costs[0], turns[1].step_costs[1]
    assert message["max_party_send_actions"] < 2 * decode["max_party_send_actions"], turns[1].step_costs


@pytest.mark.parametrize("weights", ["resident", "streamed"])
def test_chat_turns_feed_the_template_of_the_whole_conversation(tiny_llama_chat, weights):
    """Plaintext, through the chat template, with weights resident or held stage by stage (the
    cache widened block by block): the second turn continues the template's rendering of the
    whole conversation, replies included."""
    m = SecureModel.from_pretrained(str(tiny_llama_chat[0]), weights=weights)
    assert m.staged == (weights == "streamed")
    with m.conversation(reveal="logits", slot_bucket=8) as talk:
        turns = [talk.say("w5 w6 w7", 3), talk.say("w8 w9", 3)]
    tokenizer = m.model.tokenizer
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6 w7"}], add_generation_prompt=True),
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "w5 w6 w7"},
                {"role": "assistant", "content": turns[0].text},
                {"role": "user", "content": "w8 w9"},
            ],
            add_generation_prompt=True,
        ),
    ]
    eos = m.model.config.eos_token_id
    first_context = rendered[0] + (turns[0].tokens if turns[0].tokens[-1] != eos else turns[0].tokens[:-1])
    messages = [rendered[0], rendered[1][len(first_context) :]]
    assert rendered[1][: len(first_context)] == first_context, "the template renders the first turn as it was fed"
    _check_turns(tiny_llama_chat[1], turns, messages, eos, ATOL)


def test_chat_command_answers_each_line_of_standard_input(capsys, monkeypatch, tiny_llama_chat):
    """``puma chat --json`` (plaintext): one JSON line per message, the second turn's message in
    one step; no message at all is a one-line error."""
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6 w7\n\nw8 w9\n"))
    code = cli.main(["chat", "-m", str(tiny_llama_chat[0]), "--backend", "plaintext", "-n", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    turns = [json.loads(line) for line in out.strip().splitlines()]
    assert [t["turn"] for t in turns] == [1, 2] and [t["message"] for t in turns] == ["w5 w6 w7", "w8 w9"]
    assert all(1 <= len(t["tokens"]) <= 3 and t["steps"][0]["step"] == "message" for t in turns)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    code = cli.main(["chat", "-m", str(tiny_llama_chat[0]), "--backend", "plaintext"])
    _, err = capsys.readouterr()
    assert code == 1 and err.strip().splitlines() == [
        "puma: error: no message on standard input: write one per line (Ctrl-D ends the conversation)"
    ]
