"""The adapter registry: every kind declares, in its own module, how it starts, where and how it applies inside the
decoder, how it is saved and loaded, and what it counts. The model code, the checks and the save/load entry points
ask the registry; none of them names a kind.

    from fa_jax.adapters import registry
    registry.register(registry.Kind(name="my_kind", init=..., save=..., load=..., linear=...))

Sites (the places in the decoder where a kind can act; a kind fills the ones it uses):

    root      adapter tree key `name` at the top of the tree. `root(config, subtree, dtype)` returns
              ("prompt", embeddings [N, D]): virtual tokens run in front of every row, or ("prefix", (keys, values)
              [L, N, G, K]): a per-layer prefix of keys and values (models/modules.py).
    linear    the adapter subtree of one linear module (e.g. model.layers.3.self_attn.q_proj). A kind claims it when
              the subtree holds every key of `linear_keys` and none of `linear_excludes`; `linear(x, p, adapter,
              dropout)` returns the module's whole output for x [..., I] (p: {"kernel" [I, O], "bias" [O] or None};
              dropout: None or a function for the adapter's input).
    layer     subtrees of a decoder layer under the keys of `layer_sites` ({"attn_output": key, "mlp_output": key}):
              `layer(adapter, o)` maps that sub-layer's output o [B, T, D] before the residual sum.
    attention the layer's self_attn subtree when it holds `attention_keys`: `attention(adapter, q, project)` returns
              [B, T, H*K] added to the attention output before o_proj, with q [B, T, H, K] the rope'd queries and
              project(x) -> (k, v) [n, G, K] the layer's own (adapted) key/value projections.

Saving: `save(config, tree, out_dir, base_model_name_or_path=, use_rslora=, overwrite=)`; loading: `load(config,
in_dir)`, chosen by the PEFT `peft_type` of a directory's adapter_config.json (`peft_types`) or by the kind named in
a fa_jax adapter config. `num_params(tree)` counts the trainable leaves (default: every leaf but `scale`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from fa_jax.errors import FaJaxError


def _count_trainable(tree) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sum(int(x.size) for path, x in leaves if getattr(path[-1], "key", None) != "scale")


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Kind:
    name: str
    init: Callable[..., Any]  # (config, rng, section: dict, params) -> tree; section = the `adapter` config section
    defaults: dict = dataclasses.field(default_factory=dict)  # its keys of the `adapter` config section
    owns: Callable[[dict], bool] | None = None  # whether a tree holds this kind (default: from the sites below)
    mergeable: bool = False  # folds into the base weights (treemath.merge)
    needs_params: bool = False  # init reads the base weights (DoRA's magnitude)
    save: Callable[..., str] | None = None
    load: Callable[..., Any] | None = None
    peft_types: tuple = ()  # adapter_config.json peft_type values `load` reads
    num_params: Callable[[dict], int] = _count_trainable
    # sites
    root: Callable | None = None
    linear: Callable | None = None
    linear_keys: tuple = ()
    linear_excludes: tuple = ()
    check_linear: Callable | None = None  # (path, adapter, d_in, d_out, where) -> None or a FaJaxError
    layer: Callable | None = None
    layer_sites: dict = dataclasses.field(default_factory=dict)
    check_layer: Callable | None = None  # (config, path, adapter, where)
    attention: Callable | None = None
    attention_keys: tuple = ()
    check_attention: Callable | None = None  # (config, path, self_attn subtree, where)
    priority: int = 0  # kind_of reports the highest-priority kind a tree holds (a mixed tree has one main kind)

    def claims_linear(self, adapter) -> bool:
        return (self.linear is not None and isinstance(adapter, dict) and all(k in adapter for k in self.linear_keys)
                and not any(k in adapter for k in self.linear_excludes))

    def holds(self, tree) -> bool:
        """Whether the adapter tree holds this kind anywhere."""
        if self.owns is not None:
            return bool(self.owns(tree))
        if self.root is not None and self.name in (tree or {}):
            return True
        for sub in ((tree or {}).get("model", {}).get("layers", {}) or {}).values():
            if any(sub.get(key) for key in self.layer_sites.values()):
                return True
            attn = sub.get("self_attn", {}) if isinstance(sub, dict) else {}
            if self.attention is not None and all(k in attn for k in self.attention_keys):
                return True
            if any(self.claims_linear(m) for block in ("self_attn", "mlp") for m in (sub.get(block) or {}).values()):
                return True
        return False


_KINDS: dict[str, Kind] = {}


def register(kind: Kind, *, replace: bool = False) -> Kind:
    """Add a kind (from its own module, or from user code); its name becomes a valid `adapter.kind`."""
    if kind.name in _KINDS and not replace:
        raise FaJaxError(f"adapter kind {kind.name!r} is registered already")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def get(name: str) -> Kind:
    if name not in _KINDS:
        raise FaJaxError(f"adapter.kind={name!r}: expected one of {', '.join(_KINDS)}")
    return _KINDS[name]


def kinds() -> tuple[Kind, ...]:
    return tuple(_KINDS.values())


def at_root() -> tuple[Kind, ...]:
    return tuple(k for k in _KINDS.values() if k.root is not None)


def linear_kind(adapter) -> Kind | None:
    """The kind that claims a linear module's adapter subtree, or None (an empty subtree)."""
    if not adapter:
        return None
    for k in _KINDS.values():
        if k.claims_linear(adapter):
            return k
    return None


def at_layer() -> tuple[Kind, ...]:
    return tuple(k for k in _KINDS.values() if k.layer is not None)


def at_attention() -> tuple[Kind, ...]:
    return tuple(k for k in _KINDS.values() if k.attention is not None)


def layer_keys() -> dict[str, Kind]:
    """{key under a decoder layer: its kind} for every layer site of every kind."""
    return {key: k for k in _KINDS.values() for key in k.layer_sites.values()}


def for_peft_type(peft_type) -> Kind | None:
    for k in _KINDS.values():
        if peft_type in k.peft_types:
            return k
    return None


def kind_of(tree) -> Kind:
    """The main kind of an adapter tree: the highest-priority kind it holds."""
    held = [k for k in _KINDS.values() if k.holds(tree)]
    if not held:
        raise FaJaxError("the adapter tree holds no adapter of a known kind")
    return max(held, key=lambda k: k.priority)
