"""``puma generate``, ``embed``, ``classify``, ``demo`` and ``calibrate``: a model run from the
command line, its results on stdout and, on stderr, its cost and what ran where."""

from __future__ import annotations

import json
import sys

from puma import options
from puma.errors import PumaError
from puma.runtime import get_backend


def add_parsers(sub, common) -> None:
    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="greedy text continuation with a causal LM (GPT-2, LLaMA)",
    )
    options.add_model_args(gen)
    inputs = gen.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--prompt",
        "-p",
        action="append",
        help="prompt text (repeat for a batch; default: none, give --prompt or --ids)",
    )
    options.add_ids_arg(inputs)
    _add_generation_args(gen, 16, "tokens to generate")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="put each prompt through the model's chat template as a user message (GGUF or tokenizer_config.json; "
        "default: the prompt as it is)",
    )
    gen.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole window per token (default: a secret KV cache at the parties)",
    )
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="a conversation of several turns: messages from standard input, one per line; the secret "
        "KV cache stays at the parties between turns",
    )
    options.add_model_args(chat)
    _add_generation_args(chat, 64, "most tokens per reply (a reply ends earlier at the end-of-sequence token)")
    chat.add_argument(
        "--plain",
        action="store_true",
        help="continue the text turn by turn without the chat template (default: the template, when the model has one)",
    )
    chat.set_defaults(func=cmd_chat)

    emb = sub.add_parser(
        "embed",
        parents=[common],
        help="sentence embeddings with a BERT (mean pooling, L2-normalised)",
    )
    options.add_model_args(emb)
    emb.add_argument("texts", nargs="*", help="sentences to embed")
    options.add_encode_args(emb)
    emb.set_defaults(func=cmd_embed)

    cls = sub.add_parser(
        "classify",
        parents=[common],
        help="sequence classification (BertForSequenceClassification)",
    )
    options.add_model_args(cls)
    cls.add_argument("texts", nargs="*", help="texts to classify")
    options.add_encode_args(cls)
    cls.set_defaults(func=cmd_classify)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="private sentence embeddings with the real MiniLM: secure vs plaintext, cost per party",
    )
    options.add_backend_args(demo)
    options.add_approx_args(demo)
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="the model's activation ranges per layer and the fixed-point format and norm pre-scales they need",
    )
    cal.add_argument("--model", "-m", required=True, help=options.MODEL_HELP)
    cal.add_argument(
        "--approx",
        help="approximation set to check for (default: the one a secure run of the model uses)",
    )
    cal.add_argument(
        "--field",
        choices=("FM64", "FM128"),
        help="check this ring (default: the first safe format)",
    )
    cal.add_argument(
        "--fxp-bits",
        type=int,
        help="check these fraction bits (default: the first safe format)",
    )
    cal.add_argument(
        "--refresh",
        action="store_true",
        help="calibrate again instead of reading the cache (default: use the cache)",
    )
    cal.add_argument(
        "--json",
        action="store_true",
        help="print the ranges, the plan and the table as JSON (default: a table)",
    )
    cal.set_defaults(func=cmd_calibrate)


def _add_generation_args(p, max_new_tokens: int, what: str) -> None:
    """--max-new-tokens, --reveal and the sampling options of ``generate`` and ``chat``."""
    p.add_argument(
        "--max-new-tokens",
        "-n",
        type=options.positive,
        default=max_new_tokens,
        help=f"{what} (default: %(default)s)",
    )
    p.add_argument(
        "--reveal",
        choices=("token", "logits"),
        default="token",
        help="what the client receives per step: the chosen token id (computed under MPC) or the logits "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="sample at this temperature > 0 (default: greedy)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        help="with --temperature: sample among the k most likely tokens (default: all)",
    )
    p.add_argument("--seed", type=int, help="seed of the client's sampling randomness (default: random)")


def _progress(total: int, what: str, unit: str = "tok", disable: bool = False):
    """A tqdm bar on stderr when it is a terminal (and not ``disable``), else nothing."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=what,
        unit=unit,
        disable=disable or not sys.stderr.isatty(),
        leave=False,
    )


def _read_lines(path: str) -> list[str]:
    """The non-empty lines of ``path`` ('-': standard input), stripped."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except OSError as err:
        raise PumaError(f"cannot read texts from {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise PumaError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise PumaError(f"{path} has no texts (one per line)")
    return texts


def _emit(args, payload: dict, text_lines: list[str], cost=None) -> None:
    if cost is not None:
        payload["weights"] = cost.weights_mode
    secure = get_backend(args.backend).secure
    if cost is not None and secure:
        payload["stats"] = cost.to_dict()
    if args.json:
        print(json.dumps(payload))
    elif text_lines:
        print("\n".join(text_lines))
    if cost is not None and secure and not args.json:
        print(cost.summary(), file=sys.stderr)
    model = getattr(args, "secure_model", None)
    if model is not None:
        print(f"puma: {_ran_on(args, model)}", file=sys.stderr)
    plan = getattr(model, "weight_plan", None)
    if plan is not None:
        print(f"puma: {plan.describe()}", file=sys.stderr)
    fixed = getattr(model, "fixed_plan", None)
    if fixed is not None:
        print(
            f"puma: fixed point {fixed.describe()} (calibrated ranges; puma calibrate -m MODEL shows them)",
            file=sys.stderr,
        )


def _ran_on(args, model) -> str:
    """Which backend and approximation set ran: no one should mistake plaintext for MPC."""
    return f"ran {model.session.describe()}, approximation set {args.approx}"


def _sampling(args) -> tuple[float, int]:
    """(temperature, top_k) from the flags: greedy unless --temperature > 0 is given."""
    if args.temperature is not None and args.temperature <= 0:
        raise PumaError(f"--temperature must be > 0 (got {args.temperature:g}); leave it out for greedy decoding")
    if args.top_k is not None:
        if args.temperature is None:
            raise PumaError("--top-k limits sampling, so it needs --temperature (e.g. --temperature 0.8 --top-k 40)")
        if args.top_k < 1:
            raise PumaError(f"--top-k must be at least 1 (got {args.top_k})")
    return args.temperature or 0.0, args.top_k or 0


def _inputs(args, texts: list[str]) -> list:
    """The texts, or the --ids rows; not both."""
    if texts and args.ids:
        raise PumaError("give texts or --ids, not both")
    if not texts and not args.ids:
        raise PumaError("nothing to run on: give texts or --ids 5,17,2")
    return texts or args.ids


def cmd_generate(args) -> int:
    temperature, top_k = _sampling(args)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        use_cache=not args.no_cache,
        reveal=args.reveal,
        temperature=temperature,
        top_k=top_k,
        seed=args.seed,
    )
    if args.chat and args.ids:
        raise PumaError("--chat applies the chat template to text: give --prompt, not --ids")
    with options.open_model(args) as m:
        shown = _Shown.generation(m.model, args) if _streams(args) else None
        with _progress(args.max_new_tokens, "generating", disable=shown is not None) as bar:
            if args.ids:
                result = m.generate_ids(args.ids, progress=bar.update, **settings)
            else:
                stream = shown.update if shown else None
                result = m.generate(
                    args.prompt,
                    progress=bar.update,
                    chat=args.chat,
                    stream=stream,
                    **settings,
                )
        if shown:
            shown.finish()
    prompts = args.prompt or args.ids
    single = len(prompts) == 1
    payload = {
        "tokens": result.tokens[0] if single else result.tokens,
        "text": result.texts[0] if single else result.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
        "reveal": args.reveal,
        "kv_cache": not args.no_cache,
        "steps": result.step_costs,
    }
    if args.ids:
        payload["prompt_ids"] = args.ids[0] if single else args.ids
        lines = [
            f"{','.join(map(str, p))} -> {' '.join(map(str, t))}" + (f"  {text!r}" if text else "")
            for p, t, text in zip(args.ids, result.tokens, result.texts)
        ]
    elif shown:
        lines = []  # already printed token by token
    elif args.chat:
        lines = list(result.texts)
    else:
        lines = [prompt + text for prompt, text in zip(args.prompt, result.texts)]
    _emit(args, payload, lines, result.cost)
    return 0


def cmd_chat(args) -> int:
    """One reply per line of standard input, streamed to stdout as its tokens are revealed (with
    --json: one JSON line per turn). On stderr after each turn: its first-token and reply
    seconds and its cost; at the end, the whole conversation's cost and what ran where."""
    temperature, top_k = _sampling(args)
    interactive = sys.stdin.isatty()
    with options.open_model(args) as m:
        with m.conversation(
            chat=False if args.plain else None, reveal=args.reveal, temperature=temperature, top_k=top_k, seed=args.seed
        ) as talk:
            tokenizer = m.model.tokenizer

            def reply_text(tokens):
                return tokenizer.decode(tokens, skip_special_tokens=True)

            number = 0
            with m.session.measure() as total:
                for number, line in enumerate(_messages(interactive), start=1):
                    shown = None if args.json else _Shown(reply_text)
                    turn = talk.say(line, args.max_new_tokens, stream=shown.update if shown else None)
                    if shown:
                        shown.finish()
                    _report_turn(args, number, line, turn)
            if not number:
                raise PumaError("no message on standard input: write one per line (Ctrl-D ends the conversation)")
    if not args.json:
        _emit(args, {}, [], total)
    return 0


def _messages(interactive: bool):
    """The non-empty lines of standard input, stripped; at a terminal, after a ``> `` prompt."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _report_turn(args, number: int, message: str, turn) -> None:
    """A turn's JSON line (--json) or its one-line summary on stderr."""
    first, *steps = turn.step_costs
    if args.json:
        payload = {
            "turn": number,
            "message": message,
            "message_tokens": turn.message_tokens,
            "tokens": turn.tokens,
            "text": turn.text,
            "first_token_s": round(turn.first_token_s, 3),
            "reply_s": round(turn.reply_s, 3),
            "steps": turn.step_costs,
            "backend": args.backend,
            "approx": args.approx,
        }
        print(json.dumps(payload), flush=True)
        return
    if not get_backend(args.backend).secure:
        return
    per_token = f"; per reply token {sum(s['max_party_send_actions'] for s in steps) / len(steps):.0f}" if steps else ""
    print(
        f"puma: turn {number}: {turn.message_tokens} message tokens in one step, first token after "
        f"{turn.first_token_s:.1f} s, {len(turn.tokens)} tokens in {turn.reply_s:.1f} s; busiest party's send "
        f"actions: message step {first['max_party_send_actions']}{per_token}",
        file=sys.stderr,
        flush=True,
    )


def _streams(args) -> bool:
    """Whether generated text is printed as each token is revealed: one text prompt, not JSON."""
    return not args.json and not args.ids and len(args.prompt) == 1


class _Shown:
    """Prints a generation as it grows: what each revealed token adds to the decoded text
    (``decode(tokens)``). A byte-level token that ends inside a character waits for the token
    that completes it."""

    def __init__(self, decode):
        self.decode = decode
        self.printed = ""

    @classmethod
    def generation(cls, model, args) -> "_Shown":
        """For ``puma generate``'s one text prompt: the prompt first (unless it went through the
        chat template), then its continuation."""
        from puma.tasks import continuation, encode_prompts

        prompt_ids = encode_prompts(model, args.prompt, args.chat)[0]
        if not args.chat:
            print(args.prompt[0], end="", flush=True)
        return cls(lambda generated: continuation(model.tokenizer, prompt_ids, generated[0]))

    def update(self, tokens) -> None:
        text = self.decode(tokens)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text

    def finish(self) -> None:
        print(flush=True)


def _cmd_encode(args, task: str) -> int:
    """``embed`` and ``classify``: BERT passes over texts (arguments or --file) or --ids rows, in
    batches of --batch-size."""
    if args.file:
        args.texts = [*args.texts, *_read_lines(args.file)]
    inputs = _inputs(args, args.texts)
    run = {"embed": "embedding", "classify": "classifying"}[task]
    with options.open_model(args) as m, _progress(len(inputs), run, "text") as bar:
        result = getattr(m, task)(inputs, batch_size=args.batch_size, progress=bar.update)
    shown = args.texts or [",".join(map(str, r)) for r in args.ids]
    payload = {
        "texts": args.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
    }
    if args.ids:
        payload["ids"] = args.ids
    if task == "embed":
        payload["embeddings"] = result.outputs.round(6).tolist()
        lines = [
            f"{text[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:6])}, ...] ({row.shape[0]} dims)"
            for text, row in zip(shown, result.outputs)
        ]
    else:
        payload["labels"], payload["logits"] = (
            result.labels,
            result.outputs.round(6).tolist(),
        )
        lines = [f"{label:>12s}  {text}" for label, text in zip(result.labels, shown)]
    _emit(args, payload, lines, result.cost)
    return 0


def cmd_embed(args) -> int:
    return _cmd_encode(args, "embed")


def cmd_classify(args) -> int:
    return _cmd_encode(args, "classify")


def cmd_demo(args) -> int:
    from puma import demo
    from puma.api import default_approx

    args.approx = args.approx or default_approx(args.backend)
    result = demo.run(args.backend, args.approx, **options.backend_options(args))
    if args.json:
        result.pop("summary")
        print(json.dumps(result))
    else:
        print(demo.render(result))
    print(f"puma: ran {result['ran']}, approximation set {result['approx']}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from puma import calibration, protocols
    from puma.api import default_approx
    from puma.models import load
    from puma.protocols.base import FixedPoint

    ops = protocols.get(args.approx or default_approx("sim"))
    ranges = calibration.ranges_for(args.model, refresh=args.refresh)
    activation = load(args.model, weights=False).config.activation
    if args.field or args.fxp_bits is not None:
        fixed = FixedPoint(args.field or "FM64", 18 if args.fxp_bits is None else args.fxp_bits)
        chosen = calibration.plan(ranges, ops, fixed, activation)
    else:
        chosen = calibration.choose(ranges, ops, activation)
    if args.json:
        doc = {
            "model": args.model,
            "approx": ops.name,
            "format": chosen.fixed.describe(),
            "ok": chosen.ok,
            "shifts": chosen.shifts.nonzero(),
            "findings": [f.line() for f in chosen.findings],
            "margin": calibration.MARGIN,
            "table": calibration.table(ranges, chosen),
            "ranges": ranges.to_json(),
        }
        print(json.dumps(doc))
    else:
        print(calibration.render(ranges, chosen))
    if not chosen.ok:  # the one line: which site, and a format that works
        calibration.choose(ranges, ops, activation, chosen.fixed.field, chosen.fixed.fxp_bits)
    return 0
