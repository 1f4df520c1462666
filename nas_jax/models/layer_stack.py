"""Layer stacks: the ViT blocks and BERT's text and fusion layers, scanned or unrolled.

With `model.scan_layers=True` each of the three stacks is one `nn.scan` over its layer
module, and every parameter of the stack carries a leading layer axis:

  vit/blocks/...          [Lv, ...]       timm's blocks.{i}
  bert/text_layers/...    [F, ...]        HF's encoder.layer.{i}, i < F = bert.fusion_layer
  bert/fusion_layers/...  [Lb - F, ...]   encoder.layer.{i}, i >= F (these have crossattention)

With `model.scan_layers=False` (the default: it trains faster on a GPU, docs/PERF.md) the layers are
unrolled, one subtree per layer: `vit/blocks_{i}` and
`bert/layer_{i}` (i counts text and fusion layers together, as HF does). Both layouts compute the
same function from the same numbers. Scanned, the train state holds tens of arrays instead of
~2,000 (fewer host dispatches, and AdamW, the momentum EMA and the gradient norm run as a few large
kernels instead of ~1,000 tiny ones), and each layer is traced and compiled once (docs/PERF.md).

With `model.stacked_layout=True` (and scan_layers=False) the state is stored stacked, as
scanned, while the layers run unrolled: the step slices each layer's params out of the stacks and
stacks the gradients again (`train_step.train_step`), so the host dispatches and AdamW updates the
scanned layout's few arrays and XLA still compiles unrolled layers (docs/PERF.md).

Trees convert between the layouts (NAS params or params_m, a bare ViT or BERT tree, AdamW moments;
leaves numpy arrays, jax Arrays, tracers or ShapeDtypeStructs):

  stack_layers(tree, config)      per-layer subtrees → stacks
  unstack_layers(tree)            stacks → per-layer subtrees
  to_layout(tree, config)         either layout → the one `config` stores
  to_model_layout(tree, config)   either layout → the one `config`'s model applies

A leaf under a stack has a leading layer axis (`is_stacked(path)`): weight decay (rank > 1 per
layer) and the FSDP partition rules look through it.
"""

from __future__ import annotations

import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VIT_STACK, TEXT_STACK, FUSION_STACK = "blocks", "text_layers", "fusion_layers"
STACKS = (VIT_STACK, TEXT_STACK, FUSION_STACK)
_VIT_LAYER = re.compile(r"blocks_(\d+)")
_BERT_LAYER = re.compile(r"layer_(\d+)")


# ------------------------------------------------------------------------------------ modules
def scanned(layer: type[nn.Module], length: int, *, remat: bool,
            static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`layer` repeated `length` times as one `nn.scan`, its parameters stacked on axis 0.

  `layer.__call__(carry, *args)` must return `(carry, None)`; every other argument is the same for
  all layers (broadcast). The 'params' and 'dropout' rngs are split per layer, so each layer is
  initialised and drops out independently. With `remat` each layer is rematerialised in the
  backward pass (`static_argnums` as `nn.remat`'s, counting `self` as 0), as MaxText does.
  """
  if remat:
    # Inside a scan the loop already keeps XLA from merging the recomputation with the forward.
    layer = nn.remat(layer, prevent_cse=False, static_argnums=static_argnums)
  return nn.scan(layer, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=nn.broadcast, length=length)


# ------------------------------------------------------------------------------------ config
def _model_section(config):
  """The `model` section of a full config, or the model section itself; None for a bare
  `model.vit` / `model.bert` section."""
  if config is None or "patch_size" in config or "fusion_layer" in config:
    return None
  return config.model if "model" in config else config


def scan_enabled(config) -> bool:
  """Whether the model runs its stacks as `nn.scan` (and its modules take stacked params):
  `model.scan_layers` of a full config or its model section (False when absent: bare encoder
  sections and configs written before the switch existed get the default, unrolled layout)."""
  model = _model_section(config)
  return bool(model.get("scan_layers", False)) if model is not None else False


def stacked_storage(config) -> bool:
  """Whether the train state, checkpoints and conversions hold the stacked layout:
  `model.scan_layers` or `model.stacked_layout` (stacked params, unrolled layers: the step takes
  each layer's slice, `to_model_layout`, and stacks the gradients, `to_layout`)."""
  model = _model_section(config)
  return scan_enabled(config) or bool(model is not None and model.get("stacked_layout", False))


def _bert_section(config):
  if config is None:
    return None
  if "fusion_layer" in config:
    return config
  model = _model_section(config)
  return model.get("bert") if model is not None else None


# ------------------------------------------------------------------------------------ paths
def _key_name(key) -> str | None:
  for attr in ("key", "name"):
    value = getattr(key, attr, None)
    if isinstance(value, str):
      return value
  return None


def is_stacked(path) -> bool:
  """Whether the leaf at `path` (a tree_util key path, or a '/'-joined string) lies in a stack,
  i.e. has a leading layer axis."""
  names = path.split("/") if isinstance(path, str) else [_key_name(k) for k in path]
  return any(n in STACKS for n in names)


def layer_shape(path, shape) -> tuple[int, ...]:
  """The shape of one layer's slice of the leaf at `path` (the shape itself outside stacks)."""
  shape = tuple(shape)
  return shape[1:] if is_stacked(path) and shape else shape


# ------------------------------------------------------------------------------------ leaves
def _stack_leaves(*xs):
  first = xs[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(first.shape), first.dtype)
  if any(isinstance(x, jax.Array) for x in xs):
    return jnp.stack(xs)
  return np.stack([np.asarray(x) for x in xs])


def _layer_of(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def _stack_subtrees(subtrees: list, what: str):
  try:
    return jax.tree.map(_stack_leaves, *subtrees)
  except ValueError as e:
    raise ValueError(f"cannot stack {what}: its layers differ in structure ({e})") from None


def _unstack_subtree(tree, n: int) -> list:
  return [jax.tree.map(lambda x, i=i: _layer_of(x, i), tree) for i in range(n)]


def _num_layers(stack: Mapping) -> int:
  leaves = jax.tree.leaves(stack)
  if not leaves:
    raise ValueError("an empty layer stack has no layer count")
  return int(leaves[0].shape[0])


def _indexed(node: Mapping, pattern: re.Pattern) -> dict[int, str]:
  found = {}
  for k in node:
    m = pattern.fullmatch(k) if isinstance(k, str) else None
    if m:
      found[int(m.group(1))] = k
  if found and sorted(found) != list(range(len(found))):
    raise ValueError(f"per-layer keys {sorted(found.values())} are not numbered "
                     f"0..{len(found) - 1}")
  return found


# ------------------------------------------------------------------------------------ trees
def _map_containers(tree, node_fn):
  """`node_fn` applied to every Mapping of `tree`, children first; tuples, lists and namedtuples
  (optax states) are walked through, other leaves returned as they are."""
  if isinstance(tree, Mapping):
    return node_fn({k: _map_containers(v, node_fn) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_containers(v, node_fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_containers(v, node_fn) for v in tree)
  return tree


def _stack_node(node: dict, bert) -> dict:
  """One mapping: its `blocks_{i}` → 'blocks', or its `layer_{i}` → the text / fusion stacks."""
  blocks = _indexed(node, _VIT_LAYER)
  if blocks:
    if VIT_STACK in node:
      raise ValueError(f"a tree has both '{VIT_STACK}' and per-layer 'blocks_{{i}}' subtrees")
    out = {k: v for k, v in node.items() if k not in blocks.values()}
    subtrees = [node[blocks[i]] for i in range(len(blocks))]
    out[VIT_STACK] = _stack_subtrees(subtrees, "vit/blocks_{i}")
    return out
  layers = _indexed(node, _BERT_LAYER)
  if not layers:
    return node
  if bert is None:
    raise ValueError("stacking BERT's layer_{i} subtrees needs the config's model.bert section "
                     "(its fusion_layer splits the text from the fusion layers)")
  if len(layers) != bert.num_layers:
    raise ValueError(f"a BERT tree with {len(layers)} layer_{{i}} subtrees does not match "
                     f"model.bert.num_layers={bert.num_layers}")
  if TEXT_STACK in node or FUSION_STACK in node:
    raise ValueError(f"a tree has both '{TEXT_STACK}'/'{FUSION_STACK}' and per-layer 'layer_{{i}}' "
                     "subtrees")
  f = bert.fusion_layer
  out = {k: v for k, v in node.items() if k not in layers.values()}
  for name, indices in ((TEXT_STACK, range(0, f)), (FUSION_STACK, range(f, len(layers)))):
    if indices:
      out[name] = _stack_subtrees([node[layers[i]] for i in indices], f"bert/{name}")
  return out


def _unstack_node(node: dict) -> dict:
  """One mapping: 'blocks' → `blocks_{i}`; 'text_layers', 'fusion_layers' → `layer_{i}`."""
  out = {k: v for k, v in node.items() if k not in STACKS}
  if VIT_STACK in node:
    for i, sub in enumerate(_unstack_subtree(node[VIT_STACK], _num_layers(node[VIT_STACK]))):
      out[f"blocks_{i}"] = sub
  offset = 0
  for name in (TEXT_STACK, FUSION_STACK):
    if name in node:
      subs = _unstack_subtree(node[name], _num_layers(node[name]))
      for i, sub in enumerate(subs):
        out[f"layer_{offset + i}"] = sub
      offset += len(subs)
  return out


def stack_layers(tree, config=None):
  """Per-layer subtrees (`blocks_{i}`, `layer_{i}`) anywhere in `tree` → the stacks (`blocks`,
  `text_layers`, `fusion_layers`), each leaf [L, ...]. Stacks already there are kept.

  Args:
    tree: nested dicts (and tuples / namedtuples: optimizer states) of numpy arrays, jax Arrays or
      ShapeDtypeStructs, e.g. the NAS params {'vit': .., 'bert': .., ...} or a bare BERT tree.
    config: full config, its model section or its model.bert section; needed when `tree` has BERT
      layers (bert.fusion_layer splits them, bert.num_layers is checked).
  """
  bert = _bert_section(config)
  return _map_containers(tree, lambda node: _stack_node(node, bert))


def unstack_layers(tree):
  """The stacks anywhere in `tree` → per-layer subtrees `blocks_{i}` / `layer_{i}` (the inverse of
  `stack_layers`; fusion layers are numbered after the text layers)."""
  return _map_containers(tree, _unstack_node)


def to_layout(tree, config):
  """`tree` in either layout → the layout `config` stores (train state, checkpoints,
  conversions): stacked with model.scan_layers or model.stacked_layout, else one subtree per layer.
  Traceable: inside a jitted step it stacks the per-layer gradients (one copy each)."""
  return stack_layers(tree, config) if stacked_storage(config) else unstack_layers(tree)


def to_model_layout(tree, config):
  """`tree` in either layout → the layout `config`'s model applies (stacked only with
  model.scan_layers). Traceable: inside a jitted step XLA can fuse the layer slices of stacked
  params into their first use (the bf16 casts)."""
  return stack_layers(tree, config) if scan_enabled(config) else unstack_layers(tree)
