"""The ``puma`` command line: ``generate``, ``embed`` and friends.

Every failure a user can cause ends in one line ``puma: error: <what to fix>`` on stderr and a
non-zero exit status (1 for errors found while running, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from puma.errors import PumaError

log = logging.getLogger("puma")


def _add_model_args(p: argparse.ArgumentParser, default_approx: str = "exact") -> None:
    p.add_argument("--model", "-m", required=True, help="Hugging Face folder, .gguf file or preset name")
    p.add_argument("--backend", default="plaintext", help="plaintext (default)")
    p.add_argument("--approx", default=default_approx, help="approximation set (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puma", description="Private Transformer inference with 3-party MPC (SPU).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy text continuation with a causal LM (GPT-2, LLaMA)")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=16)
    gen.set_defaults(func=cmd_generate)

    emb = sub.add_parser("embed", help="sentence embeddings with a BERT (mean pooling, L2-normalised)")
    _add_model_args(emb)
    emb.add_argument("texts", nargs="+", help="sentences to embed")
    emb.set_defaults(func=cmd_embed)
    return parser


def _open(args):
    from puma.api import SecureModel

    return SecureModel.from_pretrained(args.model, approx=args.approx, backend=args.backend)


def _emit(args, payload: dict, text_lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print("\n".join(text_lines))


def cmd_generate(args) -> int:
    with _open(args) as m:
        result = m.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    single = len(args.prompt) == 1
    payload = {
        "tokens": result.tokens[0] if single else result.tokens,
        "text": result.texts[0] if single else result.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
    }
    lines = [prompt + text for prompt, text in zip(args.prompt, result.texts)]
    _emit(args, payload, lines)
    return 0


def cmd_embed(args) -> int:
    with _open(args) as m:
        result = m.embed(args.texts)
    payload = {
        "embeddings": result.outputs.round(6).tolist(),
        "texts": args.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
    }
    lines = [f"{text[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:6])}, ...] ({row.shape[0]} dims)"
             for text, row in zip(args.texts, result.outputs)]
    _emit(args, payload, lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except PumaError as err:
        print(f"puma: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("puma: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
