"""The approximation-set benchmark: function errors and costs, model fidelity, per set.

``run`` fills a resumable JSON (:class:`~puma.bench.report.CellStore`) with:

- ``errors/<set>/<plaintext|backend>``: max/mean |error| of each function on its domain;
- ``costs/<set>``: bytes and send actions (all parties) of GeLU on 128x3072, softmax on
  12x128x128, LayerNorm on 128x768, the embedding of 128 tokens from a 30522-word table;
- ``presets/<preset>/<set>``: max |logit error| of the debug presets under MPC;
- ``minilm/<set>``: MiniLM sentence-embedding cosines on SST-2 dev sentences;
- ``stories-greedy/<set>``, ``stories-lm/<set>``: stories260K greedy tokens, next-token top-1
  agreement and perplexity on the TinyStories sample.

``markdown`` renders the tables from that JSON.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from puma import protocols
from puma.api import SecureModel
from puma.bench import data, fidelity
from puma.bench import functions as F
from puma.bench.report import CellStore
from puma.runtime import open_session
from puma.runtime.base import PlaintextSession

log = logging.getLogger(__name__)

DEFAULT_SETS = ("puma", "puma-fast", "puma-lean", "mpcformer", "spu")
PRESETS = ("gpt2-debug", "bert-debug", "llama-debug")


def run(
    sets=DEFAULT_SETS,
    backend: str = "sim",
    out: str = "bench-results/protocols.json",
    data_path: str | None = None,
    sentences: int = 32,
    story_tokens: int = 64,
    new_tokens: int = 16,
    resume: bool = True,
    connect: dict | None = None,
) -> dict:
    """Fill the protocol table; ``connect`` (``config``, ``ray_address``) says where the
    ``nodes``/``ray`` parties are."""
    connect = connect or {}
    for name in sets:
        protocols.get(name)
    # the sets only choose cells: a run with more sets adds to the file
    config = {
        "backend": backend,
        "sentences": sentences,
        "story_tokens": story_tokens,
        "new_tokens": new_tokens,
        "protocol": "aby3/FM64/18",
    }
    store = CellStore(out, config, resume=resume)
    folder = data.optional_data_dir(data_path, "the MiniLM and stories260K measurements")
    jobs = [("errors", s) for s in sets] + [("costs", s) for s in sets] + [("presets", s) for s in sets]
    if folder is not None:
        jobs += [("minilm", s) for s in sets] + [("stories", s) for s in sets]
    cases = F.accuracy_cases()
    plain = PlaintextSession()
    plain.load_params({})
    for kind, name in tqdm(jobs, desc="protocol benchmark", unit="cell"):
        if kind == "errors":
            store.measure(f"errors/{name}/plaintext", lambda: F.function_errors(plain, name, cases))
            store.measure(f"errors/{name}/{backend}", lambda: _secure_errors(name, backend, connect, cases))
        elif kind == "costs":
            store.measure(f"costs/{name}", lambda: _costs(name, backend, connect))
        elif kind == "presets":
            for preset in PRESETS:
                store.measure(
                    f"presets/{preset}/{name}",
                    lambda: _with_models(preset, name, backend, connect, fidelity.preset_logit_error),
                )
        elif kind == "minilm":
            sents = data.sst2_dev(folder)[0][:sentences]
            store.measure(
                f"minilm/{name}",
                lambda: _with_models(
                    "minilm", name, backend, connect, lambda s, r: fidelity.embedding_cosines(s, r, sents)
                ),
            )
        else:
            source = str(folder / "stories260K.gguf")
            store.measure(
                f"stories-greedy/{name}",
                lambda: _with_models(
                    source,
                    name,
                    backend,
                    connect,
                    lambda s, r: fidelity.greedy_match(s, r, "Once upon a time", new_tokens),
                ),
            )
            store.measure(
                f"stories-lm/{name}",
                lambda: _with_models(
                    source,
                    name,
                    backend,
                    connect,
                    lambda s, r: fidelity.lm_agreement(s, r, _story_tokens(r, folder, story_tokens)),
                ),
            )
    return store.data


def _secure_errors(name: str, backend: str, connect: dict, cases) -> dict:
    with open_session(backend, spu_settings=protocols.get(name).spu, **connect) as session:
        session.load_params({})
        return F.function_errors(session, name, cases)


def _costs(name: str, backend: str, connect: dict) -> dict:
    with open_session(backend, spu_settings=protocols.get(name).spu, **connect) as session:
        session.load_params({})
        return F.function_costs(session, name, F.cost_cases())


def _with_models(source: str, name: str, backend: str, connect: dict, measure):
    reference = SecureModel.from_pretrained(source, approx="exact")
    with SecureModel.from_pretrained(source, approx=name, backend=backend, **connect) as secure:
        return measure(secure, reference)


def _story_tokens(reference: SecureModel, folder, length: int) -> list[list[int]]:
    tok = reference.model.tokenizer
    return [tok(story)["input_ids"][:length] for story in data.tinystories(folder)]


def add_arguments(p) -> None:
    from puma import options

    options.add_sets_arg(p, ["puma", "puma-fast", "mpcformer", "spu"])
    options.add_bench_backend_args(p)
    options.add_data_arg(p)
    p.add_argument(
        "--sentences", type=int, default=32, help="SST-2 sentences for the MiniLM cosines (default: %(default)s)"
    )
    p.add_argument("--story-tokens", type=int, default=64, help="tokens per TinyStories story (default: %(default)s)")


def main(args) -> dict:
    from puma import options

    return run(
        args.sets,
        args.backend,
        args.out,
        args.data,
        args.sentences,
        args.story_tokens,
        args.resume,
        options.connect(args),
    )


def markdown(result: dict) -> str:
    """Tables of the benchmark JSON: function errors and costs, and model fidelity per set."""
    cells, backend = result["cells"], result["config"]["backend"]
    sets = sorted({key.split("/")[1] for key in cells if key.startswith("errors/")})
    functions = ("gelu", "silu", "softmax", "layer_norm", "rms_norm")
    lines = [
        f"Function max abs error, plaintext / under SPU {result['config']['protocol']} ({backend}):",
        "",
        "| set | " + " | ".join(functions) + " |",
        "|---" * (len(functions) + 1) + "|",
    ]
    for s in sets:
        plain, secure = cells.get(f"errors/{s}/plaintext"), cells.get(f"errors/{s}/{backend}")
        if plain and secure:
            lines.append(
                f"| {s} | "
                + " | ".join(f"{plain[f]['max_abs']:.2g} / {secure[f]['max_abs']:.2g}" for f in functions)
                + " |"
            )
    lines += [
        "",
        "Cost at BERT-base shapes (argmax: one GPT-2 decode step), MB sent by all parties (send actions):",
        "",
        "| set | GeLU 128x3072 | softmax 12x128x128 | LayerNorm 128x768 | embedding 128 x 30522 | argmax 50257 |",
        "|---|---|---|---|---|---|",
    ]
    for s in sets:
        cost = cells.get(f"costs/{s}")
        if cost:
            lines.append(
                f"| {s} | "
                + " | ".join(
                    f"{cost[f]['bytes_sent'] / 1e6:.1f} ({cost[f]['send_actions']})" if f in cost else "-"
                    for f in ("gelu", "softmax", "layer_norm", "embed", "argmax")
                )
                + " |"
            )
    lines += [
        "",
        "Model fidelity under MPC:",
        "",
        "| set | debug presets max logit err (gpt2/bert/llama) | MiniLM cosine min / mean | "
        "stories260K greedy 16 | top-1 agreement | perplexity (exact) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sets:
        presets = [cells.get(f"presets/{p}/{s}") for p in PRESETS]
        minilm, greedy, lm = cells.get(f"minilm/{s}"), cells.get(f"stories-greedy/{s}"), cells.get(f"stories-lm/{s}")
        lines.append(
            f"| {s} | "
            + " / ".join(f"{p['max_abs']:.2g}" if p else "-" for p in presets)
            + (f" | {minilm['min']:.5f} / {minilm['mean']:.5f}" if minilm else " | -")
            + (
                f" | {'same' if greedy['match'] else 'differs at ' + str(greedy['matching_prefix'])}"
                if greedy
                else " | -"
            )
            + (
                f" | {lm['top1_agreement']:.4f} | {lm['perplexity']:.3f} ({lm['perplexity_exact']:.3f})"
                if lm
                else " | - | -"
            )
            + " |"
        )
    return "\n".join(lines)
