"""Model fidelity of an approximation set under MPC, against the exact plaintext model.

- ``preset_logit_error``: max |logit difference| on a debug preset (random weights).
- ``embedding_cosines``: MiniLM sentence embeddings, cosine with the exact ones per sentence.
- ``lm_agreement``: next-token top-1 agreement and perplexity on texts (stories260K, GPT-2).
- ``greedy_match``: greedy continuation identical to the exact one?
- ``greedy_prompts``: greedy continuations of several prompts (one batch) against a reference.
- ``divergences``: where such continuations differ, how close the reference's choice was there.

Each takes an open :class:`~puma.api.SecureModel` for the set under test and the plaintext
reference model, so callers control the backend.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from puma import tasks
from puma.api import SecureModel
from puma.bench.report import profiled


def preset_logit_error(secure: SecureModel, reference: SecureModel, seed: int = 0) -> dict:
    """Max and mean |output difference| on a random batch (logits, or BERT's mean embedding)."""
    model = reference.model
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 12)).astype(np.int32)
    if model.causal:
        got, want = secure.logits(ids), reference.logits(ids)
    else:
        got, want = secure.encode_ids(ids, "mean"), reference.encode_ids(ids, "mean")
    diff = np.abs(np.asarray(got.outputs, np.float64) - np.asarray(want.outputs, np.float64))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "bytes_sent": profiled(got.cost).total_bytes_sent,
    }


def embedding_cosines(secure: SecureModel, reference: SecureModel, sentences: Sequence[str], batch: int = 8) -> dict:
    """Cosine of secure vs exact sentence embeddings, per sentence; plus cost."""
    cosines, nbytes, wall = [], 0, 0.0
    for start in range(0, len(sentences), batch):
        chunk = list(sentences[start : start + batch])
        got = secure.embed(chunk)
        want = reference.embed(chunk).outputs
        cosines += [float(c) for c in np.sum(got.outputs * want, axis=-1)]
        nbytes += profiled(got.cost).total_bytes_sent
        wall += got.cost.wall_s
    return {
        "cosines": cosines,
        "min": min(cosines),
        "mean": float(np.mean(cosines)),
        "bytes_sent": nbytes,
        "wall_s": round(wall, 2),
        "sentences": len(sentences),
    }


def _bytes(cost) -> int | None:
    """Bytes sent by all parties, or None when a run could not be attributed per party (sim
    under load): accuracy does not depend on it, so the cell is kept without it."""
    return None if cost.unprofiled_runs else cost.total_bytes_sent


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def lm_agreement(secure: SecureModel, reference: SecureModel, token_lists: Sequence[Sequence[int]]) -> dict:
    """Top-1 agreement of next-token predictions and perplexity, secure vs exact.

    Each token list is scored in one run (logits revealed to the client: this is a benchmark).
    Perplexity is exp(mean next-token NLL) over all predicted positions.
    """
    agree = total = 0
    nll_secure, nll_exact, nbytes = [], [], 0
    for ids in token_lists:
        got = secure.logits([ids])
        want = reference.logits([ids]).outputs[0]
        logits = got.outputs[0]
        nbytes = None if nbytes is None or _bytes(got.cost) is None else nbytes + _bytes(got.cost)
        agree += int(np.sum(np.argmax(logits, -1) == np.argmax(want, -1)))
        total += len(ids)
        targets = np.asarray(ids[1:])
        nll_secure.append(_nll(logits[:-1], targets))
        nll_exact.append(_nll(want[:-1], targets))
    ppl = math.exp(float(np.mean(np.concatenate(nll_secure))))
    ppl_exact = math.exp(float(np.mean(np.concatenate(nll_exact))))
    return {
        "top1_agreement": agree / total,
        "positions": total,
        "perplexity": ppl,
        "perplexity_exact": ppl_exact,
        "perplexity_change": ppl / ppl_exact - 1.0,
        "bytes_sent": nbytes,
    }


def greedy_match(secure: SecureModel, reference: SecureModel, prompt: str, new_tokens: int) -> dict:
    """Greedy continuation under MPC vs exact plaintext: tokens, equality, cost."""
    got = secure.generate(prompt, new_tokens)
    want = reference.generate(prompt, new_tokens)
    return {
        "tokens": got.tokens[0],
        "exact_tokens": want.tokens[0],
        "match": got.tokens == want.tokens,
        "matching_prefix": next(
            (i for i, (a, b) in enumerate(zip(got.tokens[0], want.tokens[0])) if a != b),
            min(len(got.tokens[0]), len(want.tokens[0])),
        ),
        "text": got.texts[0],
        "bytes_sent": profiled(got.cost).total_bytes_sent,
        "wall_s": round(got.cost.wall_s, 2),
    }


def greedy_prompts(secure: SecureModel, reference: SecureModel, prompts: Sequence[str], new_tokens: int) -> dict:
    """Greedy continuations of ``prompts`` (one left-padded batch) under MPC against
    ``reference`` run the same way: per prompt, the tokens, whether they are identical and the
    length of the common prefix; and the cost."""
    got = secure.generate(list(prompts), new_tokens)
    want = reference.generate(list(prompts), new_tokens)
    prefixes = [
        next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        for g, w in zip(got.tokens, want.tokens)
    ]
    return {
        "prompts": list(prompts),
        "tokens": got.tokens,
        "reference_tokens": want.tokens,
        "match": [g == w for g, w in zip(got.tokens, want.tokens)],
        "matching_prefix": prefixes,
        "texts": got.texts,
        "bytes_sent": _bytes(got.cost),
        "wall_s": round(got.cost.wall_s, 2),
    }


def divergences(reference: SecureModel, cell: dict) -> list[dict]:
    """For each prompt of a :func:`greedy_prompts` cell whose tokens differ from the reference's,
    the reference's next-token logits at the first difference (its prompt plus the common
    prefix, in plaintext): the two tokens, the secure token's rank there and ``margin``, the
    reference's top logit less the secure token's logit. A margin near zero is a near-tie, which
    any rounding may flip."""
    out = []
    prompts = tasks.encode_prompts(reference.model, cell["prompts"])  # the ids the generation ran on
    for i, (got, want, k) in enumerate(zip(cell["tokens"], cell["reference_tokens"], cell["matching_prefix"])):
        if got == want or k >= min(len(got), len(want)):
            continue
        logits = np.asarray(reference.logits([prompts[i] + list(want[:k])]).outputs, np.float64)[0, -1]
        out.append(
            {
                "prompt": i,
                "position": k,
                "reference_token": int(want[k]),
                "secure_token": int(got[k]),
                "secure_rank": int(np.sum(logits > logits[got[k]])),
                "margin": round(float(logits[want[k]] - logits[got[k]]), 4),
            }
        )
    return out
