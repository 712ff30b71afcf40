"""Cost of private generation per step, with and without the secure key/value cache.

For each model and approximation set: bytes and send actions (all parties) of the prefill and
of every decode step with the cache, and of the window recomputation per token without it.
Without the cache every step runs the same compiled program on the same shapes, so its cost is
identical from step to step; ``nocache_steps`` steps are measured and checked equal.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from puma import calibration, protocols
from puma.api import SecureModel
from puma.bench import data
from puma.bench.report import CellStore, profiled
from puma.errors import PumaError
from puma.models import load

log = logging.getLogger(__name__)

#: name -> (source, config overrides, what it stands for)
MODELS = {
    "gpt2": ("gpt2", None, "GPT-2 base shapes (124M, random weights)"),
    "stories260K": ("stories260K.gguf", None, "stories260K (trained LLaMA, GQA)"),
    "smollm2-135m": (
        "smollm2",
        None,
        "SmolLM2-135M-Instruct (trained LLaMA, 30 layers, massive activations; calibrated FM64/18)",
    ),
    "llama-7b-layer": (
        "llama-7b",
        {"num_hidden_layers": 1, "vocab_size": 512},
        "one LLaMA-7B decoder layer (hidden 4096, FFN 11008, 32 heads); vocabulary cut to 512",
    ),
}


def _prompt(source: str, length: int, folder) -> list[int]:
    """TinyStories text for a model with a tokenizer (the built-in calibration texts without the
    data folder), random ids for a preset."""
    tokenizer = load(source, weights=False).tokenizer
    if tokenizer is None:
        return np.random.default_rng(0).integers(10, 500, length).tolist()
    text = " ".join(data.tinystories(folder) if folder is not None else calibration.TEXTS)
    return tokenizer(text)["input_ids"][:length]


def measure(
    name: str, approx: str, backend: str, connect: dict, prompt_len: int, new_tokens: int, nocache_steps: int, folder
) -> dict:
    source, overrides, what = MODELS[name]
    if name == "stories260K":
        if folder is None:
            raise PumaError("stories260K needs the data folder")
        source = str(folder / source)
    prompt = _prompt(source, prompt_len, folder)
    ops = protocols.get(approx)
    if overrides:  # a one-layer cut stands for a middle layer: no last-layer saving
        ops = ops.as_middle_layer()
    with SecureModel.from_pretrained(source, approx=ops, backend=backend, **connect, overrides=overrides) as m:
        cached = m.generate_ids([prompt], new_tokens)
        if len(cached.tokens[0]) < new_tokens:
            raise PumaError(f"{name} stopped at end-of-text after {len(cached.tokens[0])} tokens")
        cacheless = m.generate_ids([prompt], nocache_steps, use_cache=False)
    profiled(cached.cost)
    profiled(cacheless.cost)
    prefill, *steps = cached.step_costs
    nocache = cacheless.step_costs
    total = sum(s["bytes_sent"] for s in cached.step_costs)
    return {
        "model": what,
        "approx": approx,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "cache": {
            "prefill": prefill,
            "steps": steps,
            "total_bytes_sent": total,
            "total_send_actions": sum(s["send_actions"] for s in cached.step_costs),
        },
        "nocache": {
            "steps": nocache,
            "identical_steps": len({s["bytes_sent"] for s in nocache}) == 1,
            "total_bytes_sent_extrapolated": nocache[0]["bytes_sent"] * new_tokens,
        },
        "decode_over_prefill": max(s["bytes_sent"] for s in steps) / prefill["bytes_sent"],
        "all_over_prefill": total / prefill["bytes_sent"],
        "tokens": cached.tokens[0],
    }


def run(
    models=tuple(MODELS),
    sets=("puma", "puma-fast"),
    backend: str = "sim",
    prompt_len: int = 32,
    new_tokens: int = 16,
    nocache_steps: int = 3,
    out: str = "bench-results/generation.json",
    data_path: str | None = None,
    resume: bool = True,
    connect: dict | None = None,
) -> dict:
    """Fill the generation table; ``connect`` (``config``, ``ray_address``) says where the
    ``nodes``/``ray`` parties are."""
    connect = connect or {}
    config = {  # models and sets only choose cells
        "backend": backend,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "nocache_steps": nocache_steps,
    }
    store = CellStore(out, config, resume=resume)
    folder = data.optional_data_dir(data_path, "stories260K")
    cells = [(m, s) for m in models for s in sets if not (m == "stories260K" and folder is None)]
    for name, approx in tqdm(cells, desc="generation benchmark", unit="cell"):
        store.measure(
            f"{name}/{approx}",
            lambda: measure(name, approx, backend, connect, prompt_len, new_tokens, nocache_steps, folder),
        )
    return store.data


def add_arguments(p) -> None:
    from puma import options

    p.add_argument(
        "--models",
        nargs="+",
        default=["gpt2", "stories260K", "llama-7b-layer"],
        choices=list(MODELS),
        help="default: %(default)s",
    )
    options.add_sets_arg(p, ["puma", "puma-fast"])
    options.add_bench_backend_args(p)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated with the cache (default: %(default)s)")
    p.add_argument(
        "--nocache-steps", type=int, default=3, help="steps measured without the cache (default: %(default)s)"
    )
    options.add_data_arg(p)


def main(args) -> dict:
    from puma import options

    return run(
        args.models,
        args.sets,
        args.backend,
        args.prompt_len,
        args.new_tokens,
        args.nocache_steps,
        args.out,
        args.data,
        resume=args.resume,
        connect=options.connect(args),
    )


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Private generation, {cfg['prompt_len']}-token prompt, {cfg['new_tokens']} new tokens, "
        f"ABY3 ({cfg['backend']}); MB sent by all parties:",
        "",
        "| model | set | prefill | decode step (max) | step / prefill | all tokens / prefill | "
        "no-cache step | no-cache all tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in result["cells"].items():
        name = key.split("/")[0]
        c, n = cell["cache"], cell["nocache"]
        step = max(s["bytes_sent"] for s in c["steps"])
        lines.append(
            f"| {name} | {cell['approx']} | {c['prefill']['bytes_sent'] / 1e6:.1f} | {step / 1e6:.2f} | "
            f"{cell['decode_over_prefill']:.3f} | {cell['all_over_prefill']:.2f} | "
            f"{n['steps'][0]['bytes_sent'] / 1e6:.1f} | {n['total_bytes_sent_extrapolated'] / 1e6:.1f} |"
        )
    return "\n".join(lines)
