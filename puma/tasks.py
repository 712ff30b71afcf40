"""Task programs and loops: logits, greedy generation (with or without a KV cache), embeddings
and classification, written once against :class:`puma.runtime.base.Session`.

What is secret and what is public (under the secure backends): token ids and token-type ids
are the client's secrets; the attention mask, position ids and the cache slot index describe
only the lengths of the inputs, which every party learns anyway from the shapes, and are public.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puma import protocols, staged
from puma.errors import PumaError
from puma.models.loading import LoadedModel
from puma.program import Program
from puma.protocols import MASK_FILL
from puma.runtime.base import Session
from puma.runtime.cost import CostReport

log = logging.getLogger(__name__)

REVEAL_CHOICES = ("token", "logits")


# -- programs --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature == 0``) or sampled.

    Sampling under MPC uses the Gumbel-max trick: token = argmax(logits / T + g) over the top-k
    logits, with g ~ Gumbel(0, 1) drawn by the client from ``seed`` and secret-shared like any
    input, so the parties never see the randomness or the logits and the client sees only the
    sampled token. What it leaks: the token itself (as plaintext sampling would). Because the
    client chooses the noise, a dishonest client could pick it to compare chosen logits with
    each other, a little more than greedy decoding reveals; owners worried about extraction
    should keep greedy decoding for untrusted clients.
    """

    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def key(self) -> tuple:
        return (self.temperature, self.top_k)

    def spec(self) -> list:
        """What a program depends on (the seed stays with the client): [temperature, top_k]."""
        return [float(self.temperature), int(self.top_k)]


GREEDY = Sampling()


def _next_token_outputs(ops, logits, reveal: str, sampling: Sampling, secret: dict) -> dict:
    """What the client receives for the last position: a token id (greedy or sampled under MPC)
    or the logits."""
    last = logits[:, -1]  # [B, V]
    if reveal == "logits":
        return {"logits": last}
    if sampling.greedy:
        return {"token": ops.argmax(last)}
    scores = last * (1.0 / sampling.temperature)
    if sampling.top_k:
        threshold = jax.lax.top_k(scores, sampling.top_k)[0][..., -1:]  # [B, 1] k-th largest
        scores = jnp.where(scores >= threshold, scores, -MASK_FILL)
    return {"token": ops.argmax(scores + secret["gumbel"])}


def forward_program(model: LoadedModel, ops, reveal: str = "logits", sampling: Sampling = GREEDY) -> Program:
    """Causal LM over a whole window; reveals only the last position (token or logits)."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        logits, _ = module.apply(
            {"params": params},
            secret["input_ids"],
            public["attention_mask"],
            public["position_ids"],
            last_only=True,
            method="forward",
        )
        return _next_token_outputs(module.ops, logits, reveal, sampling, secret), {}

    return Program(
        f"{model.family}_forward_{reveal}",
        fn,
        key=(ops.name, model.program_key, sampling.key()),
        spec=("forward", {"reveal": reveal, "sampling": sampling.spec()}),
        builtin=protocols.registered(ops),
    )


def full_logits_program(model: LoadedModel, ops) -> Program:
    """Causal LM logits at every position, revealed to the client (perplexity, checks)."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        logits, _ = module.apply(
            {"params": params}, secret["input_ids"], public["attention_mask"], public["position_ids"], method="forward"
        )
        return {"logits": logits}, {}

    return Program(
        f"{model.family}_logits",
        fn,
        key=(ops.name, model.program_key),
        spec=("logits", {}),
        builtin=protocols.registered(ops),
    )


def prefill_program(
    model: LoadedModel, ops, max_len: int, reveal: str = "token", sampling: Sampling = GREEDY
) -> Program:
    """Run the prompt once and leave a key/value cache of ``max_len`` slots inside the backend."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        logits, cache = module.apply(
            {"params": params},
            secret["input_ids"],
            public["attention_mask"],
            public["position_ids"],
            max_len,
            method="prefill",
        )
        return _next_token_outputs(module.ops, logits, reveal, sampling, secret), {"cache": cache}

    return Program(
        f"{model.family}_prefill_{reveal}",
        fn,
        key=(ops.name, model.program_key, max_len, sampling.key()),
        spec=("prefill", {"max_len": max_len, "reveal": reveal, "sampling": sampling.spec()}),
        builtin=protocols.registered(ops),
    )


def decode_program(model: LoadedModel, ops, reveal: str = "token", sampling: Sampling = GREEDY) -> Program:
    """One new token against the cache held in the backend; the cache is updated in place."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        logits, cache = module.apply(
            {"params": params},
            secret["input_ids"],
            public["attention_mask"],
            public["position_ids"],
            state.get("cache", ()),
            public["cache_index"],
            method="decode",
        )
        return _next_token_outputs(module.ops, logits, reveal, sampling, secret), {"cache": cache}

    return Program(
        f"{model.family}_decode_{reveal}",
        fn,
        key=(ops.name, model.program_key, sampling.key()),
        spec=("decode", {"reveal": reveal, "sampling": sampling.spec()}),
        builtin=protocols.registered(ops),
    )


def grow_cache_program(model: LoadedModel, ops, slots: int) -> Program:
    """The key/value cache held in a slot, widened to ``slots`` slots with zeros (the new
    slots hold no token until a step writes one). Reveals nothing and sends nothing: padding
    shares with zeros is local to each party. Reads ``cache``: the whole model's (a tuple of
    layers) or, bound to ``cache_<i>``, one block's (:mod:`puma.staged`)."""

    def fn(params, state, secret, public):
        def widen(a):  # [B, S, Hkv, Dh] -> [B, slots, Hkv, Dh]
            return jnp.pad(a, [(0, 0), (0, slots - a.shape[1])] + [(0, 0)] * (a.ndim - 2))

        return {}, {"cache": jax.tree_util.tree_map(widen, state["cache"])}

    return Program(
        f"{model.family}_grow_cache",
        fn,
        key=(ops.name, model.program_key, slots),
        spec=("grow_cache", {"slots": slots}),
        param_keys=(),
        state_reads=("cache",),
        builtin=protocols.registered(ops),
    )


def encoder_program(model: LoadedModel, ops, head: str) -> Program:
    """BERT with one head (``hidden``, ``pooled``, ``mean``, ``classify``); reveals its output."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        out = module.apply(
            {"params": params},
            secret["input_ids"],
            public["attention_mask"],
            secret["token_type_ids"],
            public["position_ids"],
            head,
            method="encode",
        )
        return {"output": out}, {}

    return Program(
        f"{model.family}_{head}",
        fn,
        key=(ops.name, model.program_key),
        spec=("encoder", {"head": head}),
        builtin=protocols.registered(ops),
    )


def causal_step(
    session: Session,
    model: LoadedModel,
    ops,
    phase: str,
    secret: dict,
    public: dict,
    reveal: str = "token",
    sampling: Sampling = GREEDY,
    slot: str | None = None,
    max_len: int = 0,
    staged_run: bool = False,
) -> dict:
    """One causal-LM pass (``forward``, ``prefill`` or ``decode``) revealing the next token or
    logits: one program, or stage by stage with ``staged_run`` (:mod:`puma.staged`)."""
    if staged_run:
        head = causal_head({"last_only": True, "reveal": reveal, "sampling": sampling.spec()})
        return staged.run(session, model, ops, phase, secret, public, head, slot, max_len)
    if phase == "prefill":
        program = prefill_program(model, ops, max_len, reveal, sampling)
    elif phase == "decode":
        program = decode_program(model, ops, reveal, sampling)
    else:
        program = forward_program(model, ops, reveal, sampling)
    return session.run(program, secret, public, state=slot)


def causal_head(spec: dict):
    """A causal LM's head stage for ``spec``: ``last_only`` with ``reveal`` (``token`` or
    ``logits``) and ``sampling`` reveals the next token or last logits; without ``last_only``
    every position's logits."""
    if not spec["last_only"]:
        return staged.causal_head(lambda o, logits, sec: {"logits": logits}, spec)
    reveal, sampling = spec["reveal"], Sampling(*spec["sampling"])
    return staged.causal_head(lambda o, logits, sec: _next_token_outputs(o, logits, reveal, sampling, sec), spec)


def _stage_head(model: LoadedModel, ops, spec: dict) -> Program:
    head = staged.encoder_head(spec["head"]) if "head" in spec else causal_head(spec)
    return staged.head_program(model, ops, head)


#: Programs computing parties build themselves from a spec (:attr:`puma.program.Program.spec`):
#: builder -> function(model, ops, **arguments). Adding a task program is a line here.
BUILDERS = {
    "forward": lambda model, ops, reveal, sampling: forward_program(model, ops, reveal, Sampling(*sampling)),
    "logits": lambda model, ops: full_logits_program(model, ops),
    "prefill": lambda model, ops, max_len, reveal, sampling: prefill_program(
        model, ops, max_len, reveal, Sampling(*sampling)
    ),
    "decode": lambda model, ops, reveal, sampling: decode_program(model, ops, reveal, Sampling(*sampling)),
    "encoder": lambda model, ops, head: encoder_program(model, ops, head),
    "stage_embed": lambda model, ops: staged.embed_program(model, ops),
    "stage_block": lambda model, ops, layer, phase, max_len, rows: staged.block_program(
        model, ops, layer, phase, max_len, rows
    ),
    "stage_head": lambda model, ops, **spec: _stage_head(model, ops, spec),
    "grow_cache": lambda model, ops, slots: grow_cache_program(model, ops, slots),
}


def build(model: LoadedModel, ops, spec) -> Program:
    """The program ``spec`` (``[builder, arguments]``) names, built for ``model`` and ``ops``;
    a ``ValueError`` for a builder or arguments that do not exist."""
    builder, arguments = spec
    if builder not in BUILDERS or not isinstance(arguments, dict):
        raise ValueError(f"no program {builder!r}")
    try:
        return BUILDERS[builder](model, ops, **arguments)
    except (TypeError, KeyError) as err:
        raise ValueError(f"program {builder!r}: bad arguments ({err})") from None


def reveals(model: LoadedModel, spec) -> tuple[str, str | None]:
    """The task a program serves and what it reveals to the client, for the owner's policy:
    (``generate``, ``token``/``logits``), (``logits``, ``logits``) for every position's logits,
    (``embed``/``classify``/``encode``, ``outputs``), or (``stage``, None) for stages that
    reveal nothing."""
    builder, arguments = spec
    if builder in ("stage_embed", "stage_block", "grow_cache"):
        return "stage", None
    if builder in ("forward", "prefill", "decode") or (builder == "stage_head" and "head" not in arguments):
        if builder == "stage_head" and not arguments.get("last_only"):
            return "logits", "logits"
        return "generate", arguments.get("reveal")
    if builder == "logits":
        return "logits", "logits"
    head = arguments.get("head")
    return {"mean": "embed", "classify": "classify"}.get(head, "encode"), "outputs"


# -- inputs ----------------------------------------------------------------------------------


def client_ids(ops, ids: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids as the client shares them: as they are, or one-hot rows [..., V] when the
    approximation set has the client encode them (``ops.plan.client_onehot``)."""
    ids = np.asarray(ids, np.int32)
    if not ops.plan.client_onehot:
        return ids
    return (ids[..., None] == np.arange(vocab, dtype=np.int32)).astype(np.float32)


def has_chat_template(model: LoadedModel) -> bool:
    """Whether the model's tokenizer has a chat template (the GGUF's, or a folder's
    ``tokenizer_config.json``)."""
    return bool(model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None))


def encode_prompts(model: LoadedModel, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Tokenize prompts (with the tokenizer's BOS convention); refuses empty ones. With ``chat``
    each prompt is a user message put through the tokenizer's chat template, with the
    assistant's turn opened (the template's own special tokens, no BOS added twice)."""
    if not prompts:
        raise PumaError("no prompt given")
    if any(not text or not text.strip() for text in prompts):
        raise PumaError("empty prompt: give some text to continue")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise PumaError(f"{model.source} has no tokenizer: pass token ids instead of text")
    if not chat:
        return [list(tokenizer(text)["input_ids"]) for text in prompts]
    if not has_chat_template(model):
        raise PumaError(f"{model.source} has no chat template: leave out --chat and write the prompt yourself")
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        for text in prompts
    ]


def left_pad(batch: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``length``: (ids [B, length], mask [B, length])."""
    ids = np.full((len(batch), length), pad_id, np.int32)
    mask = np.zeros((len(batch), length), np.int32)
    for i, seq in enumerate(batch):
        if seq:
            ids[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids counted over real tokens: [B, S] int32 (0 on left padding)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def check_ids(model: LoadedModel, batch: Sequence[Sequence[int]]) -> None:
    """Refuse token ids outside the vocabulary (they would index past the embedding table)."""
    vocab = model.config.vocab_size
    for seq in batch:
        for tok in seq:
            if not 0 <= int(tok) < vocab:
                raise PumaError(f"token id {tok} is outside the vocabulary (0..{vocab - 1})")


def check_length(model: LoadedModel, longest: int, max_new_tokens: int = 0) -> None:
    limit = model.config.max_positions
    if longest + max_new_tokens > limit:
        what = f"prompt of {longest} tokens" + (f" plus {max_new_tokens} new tokens" if max_new_tokens else "")
        raise PumaError(f"{what} exceeds the model's {limit} positions: shorten the input or ask for fewer tokens")


# -- results ---------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """Generated ids per prompt (prompt excluded), the text they add to their prompt (see
    :func:`continuation`), and the cost of producing them."""

    tokens: list[list[int]]
    texts: list[str]
    cost: CostReport
    step_costs: list[dict] = dataclasses.field(default_factory=list)
    step_reports: list[CostReport] = dataclasses.field(default_factory=list)  # the same steps, in full


@dataclasses.dataclass
class EncodingResult:
    """One output row per input (embeddings, logits or labels) and the cost."""

    outputs: np.ndarray
    cost: CostReport
    labels: list[str] | None = None


# -- loops -----------------------------------------------------------------------------------


class StepClient:
    """The client's side of a generation step: the token ids it shares (and its sampling noise),
    and the next token it reads from what the step reveals (the token, or the logits it picks
    from itself)."""

    def __init__(self, model: LoadedModel, ops, reveal: str, sampling: Sampling, batch: int):
        if reveal not in REVEAL_CHOICES:
            raise PumaError(f"reveal must be one of {REVEAL_CHOICES}, not {reveal!r}")
        if sampling.top_k and not 0 < sampling.top_k <= model.config.vocab_size:
            raise PumaError(f"top_k must be in 1..{model.config.vocab_size}")
        self.ops, self.reveal, self.sampling, self.batch = ops, reveal, sampling, batch
        self.vocab = model.config.vocab_size
        self.rng = np.random.default_rng(sampling.seed)

    def secret(self, ids: np.ndarray) -> dict:
        """The client's inputs of a step with token ids [B, T]."""
        inputs = {"input_ids": client_ids(self.ops, ids, self.vocab)}
        if self.reveal == "token" and not self.sampling.greedy:
            inputs["gumbel"] = self.rng.gumbel(size=(self.batch, self.vocab)).astype(np.float32)
        return inputs

    def take(self, outputs) -> np.ndarray:
        """The next token per row [B] from a step's revealed outputs."""
        if self.reveal == "token":
            return np.asarray(outputs["token"]).reshape(self.batch).astype(np.int32)
        logits = np.asarray(outputs["logits"], np.float64).reshape(self.batch, self.vocab)
        if self.sampling.greedy:
            return np.argmax(logits, axis=-1).astype(np.int32)
        return _sample_plain(logits, self.sampling, self.rng)


def bucket(n: int, size: int) -> int:
    """n rounded up to a multiple of ``size`` (static shapes: one compiled program per bucket)."""
    return -(-n // size) * size


def generate(
    session: Session,
    model: LoadedModel,
    ops,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    reveal: str = "token",
    sampling: Sampling = GREEDY,
    stop_at_eos: bool = True,
    prompt_bucket: int = 8,
    slot_bucket: int = 16,
    progress: Callable[[int], Any] | None = None,
    stream: Callable[[list[list[int]]], Any] | None = None,
    staged_run: bool = False,
) -> GenerationResult:
    """Decoding of a batch of prompts (left-padded together: one secure run per step).

    With ``use_cache`` the prompt is processed once (prefill) and every further token costs one
    decode step against the key/value cache held inside the backend; without it, every token
    recomputes a fixed window (prompt + new tokens). Shapes are static: the prompt is padded to
    a multiple of ``prompt_bucket`` and the cache to a multiple of ``slot_bucket`` slots, so the
    prefill and decode programs compile once per bucket and are reused across steps and calls.
    ``reveal`` chooses what the client receives per step: the token id (argmax or sampling under
    MPC) or the last-position logits (the client then picks the token itself). ``stream`` is
    called after every step with each prompt's tokens so far, as the client receives them.
    ``staged_run`` runs every step stage by stage (:mod:`puma.staged`).
    """
    if not model.causal:
        raise PumaError(f"{model.source} is a {model.family} encoder: it cannot generate text")
    if max_new_tokens < 1:
        raise PumaError("max_new_tokens must be at least 1")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise PumaError("empty prompt: give at least one token")
    client = StepClient(model, ops, reveal, sampling, len(prompt_ids))
    secret, take = client.secret, client.take
    longest = max(len(p) for p in prompt_ids)
    check_length(model, longest, max_new_tokens)
    check_ids(model, prompt_ids)
    pad_id = int(model.config.eos_token_id)
    batch = len(prompt_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, bool)
    step_costs: list[dict] = []
    step_reports: list[CostReport] = []

    def record(tokens: np.ndarray) -> bool:
        for i, tok in enumerate(tokens):
            if not finished[i]:
                generated[i].append(int(tok))
                if stop_at_eos and tok == model.config.eos_token_id:
                    finished[i] = True
        if progress:
            progress(1)
        if stream:
            stream(generated)
        return stop_at_eos and bool(finished.all())

    prompt_len = min(bucket(longest, prompt_bucket), model.config.max_positions - max_new_tokens + 1)
    with session.measure() as total:
        if use_cache:
            slots = min(bucket(prompt_len + max_new_tokens - 1, slot_bucket), model.config.max_positions)
            ids, prompt_mask = left_pad(prompt_ids, prompt_len, pad_id)
            mask = np.zeros((batch, slots), np.int32)
            mask[:, :prompt_len] = prompt_mask
            mask[:, prompt_len:] = 1
            positions = positions_from_mask(mask)
            slot = f"kv-{id(ids)}"
            with session.measure() as step_cost:
                out = causal_step(
                    session,
                    model,
                    ops,
                    "prefill",
                    secret(ids),
                    {"attention_mask": mask, "position_ids": positions[:, :prompt_len]},
                    reveal,
                    sampling,
                    slot,
                    slots,
                    staged_run=staged_run,
                )
            step_costs.append({"step": "prefill", **step_brief(step_cost)})
            step_reports.append(step_cost)
            tokens = take(out)
            done = record(tokens)
            try:
                for k in range(1, max_new_tokens):
                    if done:
                        break
                    index = prompt_len + k - 1
                    with session.measure() as step_cost:
                        out = causal_step(
                            session,
                            model,
                            ops,
                            "decode",
                            secret(tokens[:, None]),
                            {
                                "attention_mask": mask,
                                "position_ids": positions[:, index : index + 1],
                                "cache_index": np.int32(index),
                            },
                            reveal,
                            sampling,
                            slot,
                            staged_run=staged_run,
                        )
                    step_costs.append({"step": f"decode {k}", **step_brief(step_cost)})
                    step_reports.append(step_cost)
                    tokens = take(out)
                    done = record(tokens)
            finally:
                session.free(slot)
        else:
            window = prompt_len + max_new_tokens - 1
            ids, mask = left_pad(prompt_ids, window, pad_id)
            for k in range(max_new_tokens):
                with session.measure() as step_cost:
                    out = causal_step(
                        session,
                        model,
                        ops,
                        "forward",
                        secret(ids),
                        {"attention_mask": mask, "position_ids": positions_from_mask(mask)},
                        reveal,
                        sampling,
                        staged_run=staged_run,
                    )
                step_costs.append({"step": f"forward {k}", **step_brief(step_cost)})
                step_reports.append(step_cost)
                tokens = take(out)
                if record(tokens):
                    break
                ids = np.concatenate([ids[:, 1:], tokens[:, None]], axis=1)
                mask = np.concatenate([mask[:, 1:], np.ones((batch, 1), np.int32)], axis=1)
    texts = [continuation(model.tokenizer, p, g) if model.tokenizer else "" for p, g in zip(prompt_ids, generated)]
    return GenerationResult(generated, texts, total, step_costs, step_reports)


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add to ``prompt_ids``, as the tokenizer decodes the whole sequence.

    Decoding the new ids alone loses what depends on context: SentencePiece drops the space of a
    leading ``▁was``, byte-level BPE may split a character across the boundary. The text is the
    decoded whole minus the decoded prompt (or the new ids alone if the prompt's decoding is not
    a prefix of the whole's).
    """
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    whole = tokenizer.decode([*prompt_ids, *new_ids], skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)


def _sample_plain(logits: np.ndarray, sampling: Sampling, rng) -> np.ndarray:
    """Client-side sampling from revealed logits (same rule as under MPC)."""
    scores = logits / sampling.temperature
    if sampling.top_k:
        threshold = np.sort(scores, axis=-1)[:, -sampling.top_k][:, None]
        scores = np.where(scores >= threshold, scores, -np.inf)
    return np.argmax(scores + rng.gumbel(size=scores.shape), axis=-1).astype(np.int32)


def step_brief(report: CostReport) -> dict:
    """A step's cost: totals over the parties and the busiest party's share (see
    :mod:`puma.runtime.cost` for how each is counted)."""
    parties = report.per_party or []
    return {
        "bytes_sent": report.total_bytes_sent,
        "send_actions": report.total_send_actions,
        "max_party_send_actions": max((p.send_actions for p in parties), default=0),
        "max_party_bytes_sent": max((p.bytes_sent for p in parties), default=0),
        "wall_s": round(report.wall_s, 4),
        "weight_s": round(report.weight_s, 4),
    }


def causal_logits(
    session: Session, model: LoadedModel, ops, batch_ids: Sequence[Sequence[int]], staged_run: bool = False
) -> EncodingResult:
    """Logits at every position for a batch of token lists (left-padded): [B, T, V]; stage by
    stage with ``staged_run``."""
    if not batch_ids or any(len(p) == 0 for p in batch_ids):
        raise PumaError("empty input: give at least one token")
    longest = max(len(p) for p in batch_ids)
    check_length(model, longest)
    check_ids(model, batch_ids)
    ids, mask = left_pad(batch_ids, longest, int(model.config.eos_token_id))
    secret = {"input_ids": client_ids(ops, ids, model.config.vocab_size)}
    public = {"attention_mask": mask, "position_ids": positions_from_mask(mask)}
    with session.measure() as cost:
        if staged_run:
            out = staged.run(session, model, ops, "logits", secret, public, causal_head({"last_only": False}))
        else:
            out = session.run(full_logits_program(model, ops), secret, public)
    return EncodingResult(np.asarray(out["logits"]), cost)


def encode_texts(
    model: LoadedModel, texts: Sequence[str] | Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize sentences for BERT, right-padded: (ids, token types, mask), each [B, T].

    Lists of token ids are taken as they are (token type 0), for models without a tokenizer.
    """
    if not texts:
        raise PumaError("no text given")
    if all(not isinstance(t, str) for t in texts):
        if any(len(t) == 0 for t in texts):
            raise PumaError("empty input: every row needs at least one token id")
        check_ids(model, texts)
        enc = [{"input_ids": [int(i) for i in t]} for t in texts]
    else:
        if any(not t or not t.strip() for t in texts):
            raise PumaError("empty text: every input needs some words")
        if model.tokenizer is None:
            raise PumaError(f"{model.source} has no tokenizer: give token ids with --ids")
        enc = [model.tokenizer(t) for t in texts]
    longest = max(len(e["input_ids"]) for e in enc)
    check_length(model, longest)
    ids = np.full((len(texts), longest), model.config.pad_token_id, np.int32)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):
        n = len(e["input_ids"])
        ids[i, :n] = e["input_ids"]
        types[i, :n] = e.get("token_type_ids", [0] * n)
        mask[i, :n] = 1
    return ids, types, mask


def encode(
    session: Session,
    model: LoadedModel,
    ops,
    ids: np.ndarray,
    types: np.ndarray,
    mask: np.ndarray,
    head: str,
    staged_run: bool = False,
) -> EncodingResult:
    """Run BERT with ``head`` on a padded batch; the client receives one output per row. Stage
    by stage with ``staged_run``."""
    with session.measure() as cost:
        out = _encoded(session, model, ops, ids, types, mask, head, staged_run)
    return EncodingResult(out, cost)


def _encoded(
    session: Session,
    model: LoadedModel,
    ops,
    ids: np.ndarray,
    types: np.ndarray,
    mask: np.ndarray,
    head: str,
    staged_run: bool,
) -> np.ndarray:
    """The secure BERT run of :func:`encode`, unmeasured."""
    if model.causal:
        raise PumaError(f"{model.source} is a {model.family} model: embeddings and classification need an encoder")
    if head == "classify" and not model.config.has_classifier:
        raise PumaError(f"{model.source} has no classifier head: use a BertForSequenceClassification checkpoint")
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()
    secret = {
        "input_ids": client_ids(ops, ids, model.config.vocab_size),
        "token_type_ids": client_ids(ops, types, model.config.type_vocab_size),
    }
    public = {"attention_mask": mask, "position_ids": positions}
    if staged_run:
        out = staged.run(session, model, ops, "forward", secret, public, staged.encoder_head(head))
    else:
        out = session.run(encoder_program(model, ops, head), secret, public)
    return np.asarray(out["output"])


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (sentence-transformers' last step, done by the client in plaintext)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_batches(
    session: Session,
    model: LoadedModel,
    ops,
    texts: Sequence[str] | Sequence[Sequence[int]],
    head: str,
    batch_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
    staged_run: bool = False,
) -> EncodingResult:
    """:func:`encode` over ``texts`` in batches of ``batch_size`` (default: all in one), one
    secure run per batch, each padded to its own longest text (every new shape compiles once);
    ``progress(n)`` after each batch of n texts. The cost covers every batch."""
    if not texts:
        raise PumaError("nothing to run on: give at least one text")
    size = len(texts) if batch_size is None else batch_size
    if size < 1:
        raise PumaError(f"the batch size must be at least 1 (got {size})")
    outputs = []
    with session.measure() as cost:
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            ids, types, mask = encode_texts(model, chunk)
            outputs.append(_encoded(session, model, ops, ids, types, mask, head, staged_run))
            if progress:
                progress(len(chunk))
    return EncodingResult(np.concatenate(outputs), cost)


def embed(
    session: Session,
    model: LoadedModel,
    ops,
    texts: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
    staged_run: bool = False,
) -> EncodingResult:
    """Sentence embeddings: mean-pooled last hidden state, L2-normalised by the client."""
    result = encode_batches(session, model, ops, texts, "mean", batch_size, progress, staged_run)
    result.outputs = normalize(result.outputs)
    return result


def classify(
    session: Session,
    model: LoadedModel,
    ops,
    texts: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
    staged_run: bool = False,
) -> EncodingResult:
    """Sequence classification: logits per text and the argmax label names."""
    result = encode_batches(session, model, ops, texts, "classify", batch_size, progress, staged_run)
    labels = model.config.id2label
    result.labels = [labels[i] if i < len(labels) else str(i) for i in np.argmax(result.outputs, axis=-1)]
    return result
