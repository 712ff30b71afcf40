"""A conversation of several turns whose key/value cache stays secret at the parties.

``puma generate`` starts every prompt from nothing: a second message would cost a new process
(weights loaded and shared again) and a prefill of the whole conversation so far. A
:class:`Conversation` keeps one session and one cache slot for its whole life. Each turn:

1. the client appends its message's tokens to the cache in **one** secure step (the decode
   program over all of them at once: a step's messages follow the op graph, not the token
   count, so a 20-token message costs about one decode step's send actions, not 20);
2. the reply comes one decode step per token, as in :func:`puma.tasks.generate`.

The message's tokens are padded at their front to a multiple of ``chunk_bucket`` (pad slots
are masked out of every later query, and do not advance the positions), so one compiled step
serves all messages of a bucket. When a turn would run past the cache's slots, the cache is
widened first (:func:`puma.tasks.grow_cache_program`: zeros appended to the shares, no
message sent) to the next multiple of ``slot_bucket``.

Roles: the client (the caller) writes its messages and reconstructs the replies, so it knows
the conversation's text; the parties hold the cache as shares and never see a token or a
weight; the owner shared its weights once, when the session opened. The parties learn what
every run's shapes tell them: each message's length rounded up to ``chunk_bucket``, each
reply's length, and the cache's size.

Chat models put each turn through the tokenizer's chat template: the first turn is the
template of one user message with the assistant's turn opened; a later turn is the text the
template puts after the previous reply (the reply's closing, the new user message, the
assistant's opening). The reply's tokens are the ones the model generated, never the
template's re-encoding of its text. Models without a chat template continue the text: a turn
appends the message's tokens as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from puma import staged, tasks
from puma.errors import PumaError
from puma.models.loading import LoadedModel
from puma.runtime.base import Session
from puma.runtime.cost import CostReport

log = logging.getLogger(__name__)

#: Stands for the previous reply's text when a later turn's template text is rendered: the
#: template's text after it is the turn's (the closing of the reply, the new message).
_REPLY = "\x00puma-reply\x00"


@dataclasses.dataclass
class Turn:
    """One turn: the reply's token ids and text, the cost of the turn (the message's step and
    the reply's decode steps), and the seconds to the reply's first token (the message's step,
    compilation included) and to its end."""

    tokens: list[int]
    text: str
    cost: CostReport
    message_tokens: int
    first_token_s: float
    reply_s: float
    step_costs: list[dict] = dataclasses.field(default_factory=list)
    step_reports: list[CostReport] = dataclasses.field(default_factory=list)  # the same steps, in full
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # [V] per reply token (reveal="logits")


class Conversation:
    """A chat with one model over one session; :meth:`say` takes a turn, :meth:`close` frees
    the cache at the parties (also on ``with``-exit). See the module docstring for what each
    role sees."""

    def __init__(
        self,
        session: Session,
        model: LoadedModel,
        ops,
        *,
        chat: bool | None = None,
        reveal: str = "token",
        sampling: tasks.Sampling = tasks.GREEDY,
        chunk_bucket: int = 8,
        slot_bucket: int = 16,
        staged_run: bool = False,
    ):
        if not model.causal:
            raise PumaError(f"{model.source} is a {model.family} encoder: it cannot hold a conversation")
        templated = tasks.has_chat_template(model)
        if chat and not templated:
            raise PumaError(f"{model.source} has no chat template: leave out --chat to continue the text turn by turn")
        self.session, self.model, self.ops = session, model, ops
        self.chat = templated if chat is None else chat
        self.reveal, self.sampling = reveal, sampling
        self.client = tasks.StepClient(model, ops, reveal, sampling, 1)
        self.chunk_bucket, self.slot_bucket = chunk_bucket, slot_bucket
        self.staged_run = staged_run
        self.slot = f"conversation-{id(self)}"
        self.slots = 0  # the cache's size; 0 before the first turn
        self.mask = np.zeros((1, 0), np.int32)  # [1, slots]: 1 where a slot holds a token
        self.index = 0  # the next free slot
        self.messages: list[dict] = []  # the template's view: user and assistant texts
        self.pending: list[int] = []  # the last reply's last token: revealed, not yet in the cache
        self.history: list[int] = []  # the tokens the cache holds, in order (no padding)
        self.closed = False

    # -- the turn's tokens -------------------------------------------------------------------

    def _message_ids(self, text: str) -> list[int]:
        """The tokens this turn appends before the reply: see the module docstring."""
        if not self.messages:  # as puma generate encodes a prompt
            return tasks.encode_prompts(self.model, [text], self.chat)[0]
        tokenizer = self.model.tokenizer
        if not self.chat:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        history = [*self.messages[:-1], {"role": "assistant", "content": _REPLY}, {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        if rendered.count(_REPLY) != 1:
            raise PumaError(f"{self.model.source}'s chat template rewrites replies: it cannot continue a conversation")
        after = rendered.split(_REPLY)[1]
        return list(tokenizer(after, add_special_tokens=False)["input_ids"])

    # -- the secure steps --------------------------------------------------------------------

    def _reserve(self, needed: int) -> None:
        """Make the cache at least ``needed`` slots (the first turn sizes it in its prefill)."""
        if needed <= self.slots:
            return
        slots = tasks.bucket(needed, self.slot_bucket)
        if self.slots:
            program = tasks.grow_cache_program(self.model, self.ops, slots)
            if self.staged_run:
                for i in range(self.model.config.num_layers):
                    self.session.run(program, {}, {}, state=self.slot, bind={"cache": staged.cache_entry(i)})
            else:
                self.session.run(program, {}, {}, state=self.slot)
            log.info("conversation cache widened from %d to %d slots", self.slots, slots)
        self.mask = np.concatenate([self.mask, np.zeros((1, slots - self.slots), np.int32)], axis=1)
        self.slots = slots

    def _step(self, ids: list[int], first: bool) -> dict:
        """Append ``ids`` (padded at their front to the chunk bucket, or one decode token) in one
        secure step; returns what it reveals."""
        width = tasks.bucket(len(ids), self.chunk_bucket) if len(ids) > 1 or first else 1
        padded = np.full((1, width), int(self.model.config.eos_token_id), np.int32)
        padded[0, width - len(ids) :] = ids
        start = self.index
        self.mask[0, start + width - len(ids) : start + width] = 1
        positions = tasks.positions_from_mask(self.mask)
        public = {"attention_mask": self.mask.copy(), "position_ids": positions[:, start : start + width]}
        if not first:
            public["cache_index"] = np.int32(start)
        out = tasks.causal_step(
            self.session,
            self.model,
            self.ops,
            "prefill" if first else "decode",
            self.client.secret(padded),
            public,
            self.reveal,
            self.sampling,
            self.slot,
            self.slots,
            staged_run=self.staged_run,
        )
        self.index += width
        self.history += ids
        return out

    def say(self, text: str, max_new_tokens: int = 64, stream: Callable[[list[int]], Any] | None = None) -> Turn:
        """The reply to ``text`` (at most ``max_new_tokens`` tokens; it ends early at the end of
        sequence token). ``stream(tokens)`` is called with the reply's tokens after every step."""
        if not text or not text.strip():
            raise PumaError("empty message: say something")
        if max_new_tokens < 1:
            raise PumaError("max_new_tokens must be at least 1")
        if self.model.tokenizer is None:
            raise PumaError(f"{self.model.source} has no tokenizer: use say_ids with token ids")
        return self.say_ids(self._message_ids(text), max_new_tokens, stream, text)

    def say_ids(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        stream: Callable[[list[int]], Any] | None = None,
        text: str | None = None,
    ) -> Turn:
        """As :meth:`say` for a message given as token ids (appended as they are)."""
        if self.closed:
            raise PumaError("this conversation is closed (its cache was freed): start a new one")
        ids = [*self.pending, *map(int, ids)]
        if len(ids) == len(self.pending):
            raise PumaError("empty message: give at least one token")
        tasks.check_ids(self.model, [ids])
        tasks.check_length(self.model, len(self.history) + len(ids), max_new_tokens)
        first = self.slots == 0
        width = tasks.bucket(len(ids), self.chunk_bucket)
        self._reserve(self.index + width + max_new_tokens - 1)
        eos = int(self.model.config.eos_token_id)
        reply: list[int] = []
        logits: list[np.ndarray] = []
        step_costs: list[dict] = []
        step_reports: list[CostReport] = []

        def advance(step: str, step_ids: list[int], first: bool) -> int:
            with self.session.measure() as step_cost:
                out = self._step(step_ids, first)
            step_costs.append({"step": step, **tasks.step_brief(step_cost)})
            step_reports.append(step_cost)
            if self.reveal == "logits":
                logits.append(np.asarray(out["logits"], np.float64).reshape(-1))
            reply.append(int(self.client.take(out)[0]))
            if stream:
                stream(list(reply))
            return reply[-1]

        start = time.perf_counter()
        with self.session.measure() as cost:
            token = advance("message", ids, first)
            first_token_s = time.perf_counter() - start
            while token != eos and len(reply) < max_new_tokens:
                token = advance(f"decode {len(reply)}", [token], False)
        self.pending = [] if token == eos else [token]
        said = self.model.tokenizer.decode(reply, skip_special_tokens=True) if self.model.tokenizer else ""
        self.messages += [{"role": "user", "content": text or ""}, {"role": "assistant", "content": said}]
        seconds = time.perf_counter() - start
        return Turn(reply, said, cost, len(ids), first_token_s, seconds, step_costs, step_reports, logits)

    def close(self) -> None:
        """Free the cache at the parties (the conversation cannot go on after)."""
        if self.slots and not self.closed:
            self.session.free(self.slot)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
