"""The Python API: :class:`SecureModel`, in the spirit of Hugging Face's ``from_pretrained``.

>>> m = SecureModel.from_pretrained("../shared/data/stories260K.gguf", approx="puma", backend="sim")
>>> out = m.generate(["Once upon a time"], max_new_tokens=8)
>>> out.texts[0], out.cost.total_bytes_sent

Roles: the :class:`SecureModel` object is the driver and plays the client: it loads only the
public part of the model (config, tokenizer), shares inputs and alone reconstructs outputs. The
model owner loads the weights and secret-shares them to the computing parties once, at
construction: in its own Ray actor on the ``ray`` backend, in the driver's process (weights
dropped once shared) on ``sim``; on ``nodes`` it publishes them into each party's own store
(:mod:`puma.deploy`) and the driver runs on the manifest. With ``backend="plaintext"`` nothing
is shared: it is the reference the secure backends are measured against. Every backend is
reached through the :class:`puma.runtime.base.Session` interface alone.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from puma import calibration, deploy, progress, protocols, tasks
from puma.conversation import Conversation
from puma.errors import PumaError
from puma.manifest import client_model, is_manifest, read_manifest
from puma.models import LoadedModel, load, loading
from puma.runtime import budget, get_backend, open_session, resolve_topology
from puma.runtime.base import Session
from puma.runtime.roles import OwnerSpec

log = logging.getLogger(__name__)


def _plan(model: LoadedModel, session: Session, mode: str, memory_budget: int | None) -> budget.WeightPlan:
    """Resident or streamed weights for ``model`` on ``session`` (see :mod:`puma.runtime.budget`)."""
    if memory_budget is None:
        memory_budget = budget.default_budget(session.weight_hosts())
    shapes = loading.param_shapes(model.family, model.config)
    stages = model.module().stages()  # an encoder's: for its widest head
    table_rows = session.table_row_blocks(shapes[stages.table]) if stages.table else []
    return budget.plan(shapes, stages, session.weight_bytes(), memory_budget, mode, table_rows)


def preflight(
    source: str, model: LoadedModel, ops, backend_options: dict, overrides: dict | None = None
) -> calibration.Plan:
    """The fixed-point format and norm shifts a secure run of ``model`` needs (see
    :mod:`puma.calibration`): the format asked for (``field``/``fxp_bits`` in ``backend_options``,
    or a topology file's) if the calibrated ranges fit it, else a one-line refusal; the first
    safe format when none is asked for. Sets ``model.shifts`` and the options' format."""
    ranges = calibration.ranges_for(source, overrides)
    field, bits, config = backend_options.get("field"), backend_options.get("fxp_bits"), backend_options.get("config")
    if config:
        _, proto = resolve_topology(config, backend_options.get("protocol"), bits, field)
        field, bits = proto.field, proto.fxp_bits
    chosen = calibration.choose(ranges, ops, model.config.activation, field, bits, locked=bool(config))
    model.shifts = chosen.shifts
    backend_options.update(field=chosen.fixed.field, fxp_bits=chosen.fixed.fxp_bits)
    log.info("fixed point: %s", chosen.describe())
    return chosen


def default_approx(backend: str) -> str:
    """The approximation set used when none is named: exact in plaintext, ``puma-fast`` under
    MPC (the most accurate set: SmolLM2's greedy tokens equal its plaintext run on 5 of 5
    prompts; cheaper than ``puma`` on every function measured). ``puma-chat`` sends fewer than
    half the messages per token (its greedy tokens also equal its plaintext run on 5 of 5
    prompts) but more bytes, and takes longer per token where computation, not rounds, bounds a
    step (``sim`` on a small machine): it is opt-in (bench-results/latency.json)."""
    return "puma-fast" if get_backend(backend).secure else "exact"


def _default_for(source: str, backend: str) -> str:
    """:func:`default_approx`; for a published model, the first set its owner allows when the
    owner did not publish the default."""
    chosen = default_approx(backend)
    if is_manifest(source):
        allowed = read_manifest(source)[0].get("policy", {}).get("approx") or [chosen]
        return chosen if chosen in allowed else allowed[0]
    return chosen


class SecureModel:
    """A loaded model bound to a backend session and an approximation set."""

    def __init__(
        self, model: LoadedModel, session: Session, ops: "protocols.Ops | str" = "exact", staged: bool = False
    ):
        """Bind ``model`` to ``session`` with approximation set ``ops`` (an :class:`Ops`, or its
        name); the session must already hold the model's weights. ``staged`` runs every task
        stage by stage (:mod:`puma.staged`) instead of as one program."""
        self.model = model
        self.session = session
        self.ops = protocols.get(ops)
        self.staged = staged
        self.weight_plan: budget.WeightPlan | None = None
        self.fixed_plan: calibration.Plan | None = None

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        approx: str | None = None,
        backend: str = "plaintext",
        overrides: dict | None = None,
        weights: str = "auto",
        memory_budget: int | None = None,
        staged: bool | None = None,
        share_store: str | None = None,
        network: str | None = None,
        calibrate: bool = True,
        **backend_options,
    ) -> "SecureModel":
        """Load ``source`` (HF folder, ``.gguf``, preset) and open a ``backend`` session for it.

        ``approx`` names the approximation set: by default :func:`default_approx` (``"exact"`` in
        plaintext, ``"puma-fast"`` under MPC).
        The default backend here is ``"plaintext"`` (the reference); the ``puma`` command
        defaults to ``sim``. ``backend_options`` go to
        :func:`puma.runtime.open_session` (``protocol``, ``fxp_bits``, ``config`` topology file,
        ``ray_address``, ...). The approximation set's SPU settings are applied to the session.

        ``weights`` is ``"resident"`` (shared once, kept for every query), ``"streamed"`` (each
        stage's weights shared just before it runs and dropped after) or ``"auto"`` (resident
        when the shares fit ``memory_budget`` bytes per process, else streamed; see
        :mod:`puma.runtime.budget`). ``staged`` runs the model stage by stage (default: when
        streamed); :attr:`weight_plan` says which mode ran and why. ``share_store`` (a folder on
        each party's own disk) keeps streamed shares at the parties between queries and
        sessions, so the owner shares each weight once (see ``SecureSession.use_share_store``).
        :attr:`staged` says whether tasks run stage by stage.
        ``network`` (``lan``, ``wan`` or ``BANDWIDTH,RTT``; :func:`puma.network.parse`) replaces
        the set's embedding by the one of :mod:`puma.protocols.embeddings` that is cheapest on
        that network for this model's table (``ops.name`` then says which, e.g.
        ``puma-fast+gather``).

        On a secure backend the model's activation ranges are calibrated first (once per model,
        cached; :mod:`puma.calibration`): ``field``/``fxp_bits`` left out pick the first format
        that computes the model right, given ones are refused in one line if they would not;
        :attr:`fixed_plan` says which format and norm pre-scales run. ``calibrate=False`` skips
        this (random presets only ever need FM64/18 unscaled; a real LLM may then be wrong).
        """
        approx = _default_for(source, backend) if approx is None else approx
        by_stage = weights == "streamed" if staged is None else staged  # on a published model
        publishes = get_backend(backend).publishes
        if share_store and publishes:
            raise PumaError(
                f"on {backend} the parties keep published models in their own stores: leave out --share-store"
            )
        if is_manifest(source):
            return cls._from_manifest(source, approx, backend, backend_options, by_stage)
        if publishes and backend_options.get("config"):
            resolve_topology(
                backend_options["config"],
                backend_options.get("protocol"),
                backend_options.get("fxp_bits"),
                backend_options.get("field"),
            )  # a protocol that does not fit the topology is refused before anything connects
            progress.status("publishing %s to the parties as the model owner (unless they hold it)", source)
            manifest = deploy.ensure_published(backend_options["config"], source, approx, overrides)
            return cls._from_manifest(manifest, approx, backend, backend_options, by_stage)
        ops = protocols.get(approx)
        progress.status("loading %s", source)
        model = load(source, overrides=overrides, weights=False)
        if network is not None:
            from puma.network import parse
            from puma.protocols import embeddings

            try:
                net = parse(network)
            except ValueError as err:
                raise PumaError(str(err)) from None
            config = model.config
            hidden = getattr(config, config.FIELDS["hidden"])
            ops = embeddings.for_network(ops, config.vocab_size, hidden, net)
            log.info("embedding for %s: %s (set %s)", net.describe(), embeddings.kind_of(ops), ops.name)
        fixed_plan = None
        if get_backend(backend).secure:
            if calibrate:
                fixed_plan = preflight(source, model, ops, backend_options, overrides)
            progress.status("opening a %s session (%s)", backend, ops.name)
        session = open_session(backend, spu_settings=ops.spu, **backend_options)
        try:
            plan = _plan(model, session, weights, memory_budget)
            streamed = plan.mode == "streamed"
            by_stage = streamed if staged is None else staged
            log.info("%s (%s)", plan.describe(), "staged" if by_stage else "one program")
            if not streamed:
                progress.status("loading the weights (%s)", plan.describe())
            joins = loading.FAMILIES[model.family].joins if ops.plan.fused_projections else ()
            spec = OwnerSpec(source, tuple(sorted((overrides or {}).items())), joins=joins)
            store_id = deploy.model_id(source, overrides) + ("-joined" if joins else "") if share_store else ""
            session.load_model(spec, model.param_avals(joined=bool(joins)), streamed, share_store, store_id)
            secure = cls(model, session, ops, by_stage)
            secure.weight_plan = plan
            secure.fixed_plan = fixed_plan
            return secure
        except BaseException:
            session.close()
            raise

    @classmethod
    def _from_manifest(
        cls, manifest: str, approx: str, backend: str, backend_options: dict, staged: bool
    ) -> "SecureModel":
        """A client's session on a model the owner published to the parties (``nodes``): the
        manifest gives the config, tokenizer and format; no weights file is opened. ``staged``
        runs stage by stage (parties that cannot hold the model read each stage's shares from
        their stores while it runs)."""
        from puma.runtime import BACKENDS

        if not get_backend(backend).publishes:
            where = " or ".join(f"--backend {name}" for name, b in BACKENDS.items() if b.publishes)
            raise PumaError(f"{manifest} is a published model's manifest: run it with {where} -c TOPOLOGY")
        topology, _ = resolve_topology(backend_options.get("config"))
        if topology is None:
            raise PumaError(f"--backend {backend} needs the parties' topology: pass --config configs/3pc.yaml")
        view, model = client_model(manifest, approx, topology)
        ops = protocols.get(approx)
        options = {k: backend_options.get(k) for k in ("config", "ray_address", "ray_token", "identity")}
        options.update(field=view.fixed.field, fxp_bits=view.fixed.fxp_bits)
        progress.status("opening a job on %s at the parties (%s)", view.model_id, approx)
        session = open_session(backend, spu_settings=ops.spu, model=view.model_id, **options)
        try:
            session.open_published(view.model_id, view.param_avals, approx)
            secure = cls(model, session, ops, staged)
            secure.fixed_plan = calibration.Plan(view.fixed, view.shifts[approx], ())
            secure.weight_plan = budget.WeightPlan(
                "published", 0, 0, ("", 0), f"the parties hold {view.model_id} in their own stores"
            )
            return secure
        except BaseException:
            session.close()
            raise

    # -- tasks -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str] | str,
        max_new_tokens: int = 16,
        *,
        use_cache: bool = True,
        reveal: str = "token",
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        progress=None,
        stream=None,
    ) -> tasks.GenerationResult:
        """Continue each prompt (one batch); returns tokens, texts and the cost report.

        Greedy by default; ``temperature > 0`` samples (with ``top_k``, from client randomness
        ``seed``). ``reveal="token"`` (default) computes the choice under MPC and reveals only the
        token id; ``reveal="logits"`` hands the client the logits. ``use_cache`` keeps a secret
        key/value cache at the parties between steps. ``chat`` puts each prompt through the
        tokenizer's chat template as a user message. ``stream(tokens)`` is called after every
        step with each prompt's tokens so far.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = tasks.encode_prompts(self.model, prompts, chat)
        return self.generate_ids(
            ids,
            max_new_tokens,
            use_cache=use_cache,
            reveal=reveal,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            progress=progress,
            stream=stream,
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 16,
        *,
        use_cache: bool = True,
        reveal: str = "token",
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        prompt_bucket: int = 8,
        slot_bucket: int = 16,
        progress=None,
        stream=None,
    ) -> tasks.GenerationResult:
        """Like :meth:`generate` for token-id prompts. ``prompt_bucket``/``slot_bucket`` round
        the static shapes (1 measures exactly the given lengths)."""
        sampling = tasks.Sampling(temperature, top_k, seed)
        return tasks.generate(
            self.session,
            self.model,
            self.ops,
            prompt_ids,
            max_new_tokens,
            use_cache=use_cache,
            reveal=reveal,
            sampling=sampling,
            prompt_bucket=prompt_bucket,
            slot_bucket=slot_bucket,
            progress=progress,
            stream=stream,
            staged_run=self.staged,
        )

    def conversation(
        self,
        *,
        chat: bool | None = None,
        reveal: str = "token",
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        chunk_bucket: int = 8,
        slot_bucket: int = 16,
    ) -> Conversation:
        """A conversation of several turns on this session (:class:`puma.conversation.Conversation`):
        its key/value cache stays secret at the parties between turns, so a turn costs one
        secure step for the whole message and one per reply token. ``chat`` puts turns through
        the chat template (default: when the tokenizer has one); sampling as :meth:`generate`;
        ``chunk_bucket``/``slot_bucket`` round a message's tokens and the cache's slots."""
        return Conversation(
            self.session,
            self.model,
            self.ops,
            chat=chat,
            reveal=reveal,
            sampling=tasks.Sampling(temperature, top_k, seed),
            chunk_bucket=chunk_bucket,
            slot_bucket=slot_bucket,
            staged_run=self.staged,
        )

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray) -> tasks.EncodingResult:
        """Causal-LM logits at every position for token-id lists: outputs [B, T, V]."""
        return tasks.causal_logits(
            self.session, self.model, self.ops, [list(map(int, r)) for r in input_ids], self.staged
        )

    def encode_ids(
        self,
        input_ids: Sequence[Sequence[int]] | np.ndarray,
        head: str = "mean",
        token_type_ids: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tasks.EncodingResult:
        """An encoder's output per row of a padded token-id batch [B, T]: ``head`` ``hidden``
        (every position), ``mean`` (hidden states mean-pooled over the mask), ``pooled`` (BERT's
        pooler) or ``classify`` (the classifier's logits). Token types default to zeros, the mask
        to ones."""
        ids = np.asarray(input_ids, np.int32)
        types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        return tasks.encode(self.session, self.model, self.ops, ids, types, mask, head, self.staged)

    def embed(
        self, texts: Sequence[str] | Sequence[Sequence[int]] | str, batch_size: int | None = None, progress=None
    ) -> tasks.EncodingResult:
        """L2-normalised mean-pooled sentence embeddings (BERT): outputs [B, D]. Texts, or lists
        of token ids; ``batch_size`` texts per secure run (default: all), ``progress(n)`` after
        each batch."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return tasks.embed(self.session, self.model, self.ops, texts, batch_size, progress, self.staged)

    def classify(
        self, texts: Sequence[str] | Sequence[Sequence[int]] | str, batch_size: int | None = None, progress=None
    ) -> tasks.EncodingResult:
        """Classifier logits [B, num_labels] and label names (BertForSequenceClassification).
        Texts, or lists of token ids; batches as for :meth:`embed`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return tasks.classify(self.session, self.model, self.ops, texts, batch_size, progress, self.staged)

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
