"""Checkpoint conversion: synthetic state dicts with every key ALBEF / NAS_ALBEF / HF BERT / DeiT
have (tiny shapes) round-trip into our trees and through disk; every key is accounted for;
mismatches are errors naming keys; the NAS visual dictionary matches a PyTorch re-implementation of
the authors' module; a .pth without PyTorch is a one-line error that says what to do."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nas_jax import config_lib, convert
from nas_jax.models import layer_stack
from nas_jax.models.bert import BertModel
from nas_jax.models.vit import VisionTransformer
from torch_layouts import StateDictMaker

DV, DT, E, Q = 24, 16, 8, 12          # vision width, text width, ITC embed dim, queue size
M = 32                                # visual dictionary size of the NAS_ALBEF state dicts
ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH, SRC_RES, VIT_LAYERS, BERT_LAYERS, FUSION, VOCAB, MAX_POS = 16, 32, 2, 4, 2, 30, 12


def tiny_config(image_size=SRC_RES, scan_layers=True):
  c = config_lib.base_config()
  c.model.scan_layers = scan_layers
  c.model.vit.update(image_size=image_size, patch_size=PATCH, hidden_size=DV,
                     num_layers=VIT_LAYERS, num_heads=2, mlp_dim=2 * DV)
  c.model.bert.update(vocab_size=VOCAB, hidden_size=DT, num_layers=BERT_LAYERS,
                      fusion_layer=FUSION, num_heads=2, intermediate_size=2 * DT,
                      max_position_embeddings=MAX_POS)
  c.model.embed_dim = E
  return c


class Maker(StateDictMaker):
  """PyTorch state dicts at this file's tiny shapes, plus the NAS authors' visual dictionary."""

  def __init__(self, seed):
    super().__init__(tiny_config().model, seed)

  def neck(self, p, size=M, mask_emb=False):
    """The NAS authors' SimpleVDforPreGate (in = out = the ViT width) with SOHO_Pre_VD buffers."""
    self.linear(p + "linear.0.", DV, DV)
    self.norm(p + "linear.1.", DV)
    self.norm(p + "ln.", DV)
    self.t(p + "vq.embed", size, DV)
    self.sd[p + "vq.cluster_size"] = np.zeros(size, np.float32)
    self.sd[p + "vq.cluster_sum"] = np.zeros(size, np.float32)
    self.sd[p + "vq.embed_avg"] = np.zeros((size, DV), np.float32)
    self.linear(p + "gate_fc.0.", 2 * DV, 2)
    self.norm(p + "gate_fc.1.", 2)
    self.linear(p + "pos_line.", DV, DV)
    if mask_emb:  # Their commits up to 09eb090.
      self.t(p + "mask_emb.weight", 1, DV)


def albef_state_dict(kind: str, seed: int = 0) -> dict:
  """Every key of salesforce/ALBEF's model_pretrain / model_retrieval state dict, tiny shapes."""
  return Maker(seed).albef(kind, queue_size=Q)


def nas_state_dict(kind: str, seed: int = 0, **neck) -> dict:
  """NAS_ALBEF's state dict: ALBEF's keys plus the visual dictionary under 'neck.'."""
  sd = albef_state_dict(kind, seed)
  m = Maker(seed + 100)
  m.neck("neck.", **neck)
  return {**sd, **m.sd}


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _expected_shapes(config):
  """(ViT, BERT) parameter shapes of the modules `config` builds (its model.scan_layers layout)."""
  scan = config.model.scan_layers
  res = config.model.vit.image_size
  vit = jax.eval_shape(VisionTransformer(config.model.vit, scan_layers=scan).init,
                       jax.random.key(0), jnp.zeros((1, res, res, 3)))
  ids = jnp.zeros((1, 3), jnp.int32)
  bert = jax.eval_shape(BertModel(config.model.bert, scan_layers=scan).init, jax.random.key(0),
                        ids, ids, jnp.zeros((1, 2, DV)))
  return _shapes(vit["params"]), _shapes(bert["params"])


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
def test_albef_round_trip(kind, scan):
  sd = albef_state_dict(kind)
  # 2x2 -> 3x3 patches: the position embedding is resampled.
  config = tiny_config(image_size=48, scan_layers=scan)
  report = convert.Report()
  out = convert.convert_albef(sd, config, report=report)
  assert ("blocks" in out["params"]["vit"]) == scan and ("blocks_0" in out["params"]["vit"]) != scan
  # Values are checked per layer, in PyTorch's numbering.
  params, params_m = layer_stack.unstack_layers((out["params"], out["params_m"]))
  queues = out["queues"]
  assert report.layout == f"model_{kind}"

  # Every key consumed; only the position-id buffers are left over, and they are reported.
  assert set(report.unused) == {k for k in sd if k.endswith("position_ids")}
  assert set(params) == {"vit", "bert", "vision_proj", "text_proj", "itm_head", "temp"}
  assert set(params_m) == {"vit", "bert", "vision_proj", "text_proj"}

  vit_shapes, bert_shapes = _expected_shapes(config)
  for tree in (out["params"], out["params_m"]):
    assert _shapes(tree["vit"]) == vit_shapes
    assert _shapes(tree["bert"]) == bert_shapes  # MLM head included (fresh for retrieval).
    assert tree["vision_proj"]["kernel"].shape == (DV, E)
    assert tree["text_proj"]["kernel"].shape == (DT, E)
  assert params["itm_head"]["kernel"].shape == (DT, 2)
  assert params["temp"].shape == () and params["temp"] == np.float32(0.07)

  # Values land where they belong (torch Linear [out, in] -> Dense kernel [in, out]).
  pre = "text_encoder.bert." if kind == "pretrain" else "text_encoder."
  np.testing.assert_array_equal(params["vision_proj"]["kernel"], sd["vision_proj.weight"].T)
  np.testing.assert_array_equal(params_m["text_proj"]["bias"], sd["text_proj_m.bias"])
  np.testing.assert_array_equal(params["bert"]["layer_3"]["crossattention"]["key"]["kernel"],
                                sd[pre + "encoder.layer.3.crossattention.self.key.weight"].T)
  np.testing.assert_array_equal(params["vit"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                sd["visual_encoder.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["vit"]["patch_embed"]["proj"]["kernel"],
                                sd["visual_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  assert params["vit"]["pos_embed"].shape == (1, 10, DV)
  np.testing.assert_array_equal(params["vit"]["pos_embed"][0, 0],
                                sd["visual_encoder.pos_embed"][0, 0])  # CLS row kept.

  # Momentum copies are their own weights, distinct from the online ones.
  online, momentum = jax.tree.leaves(params["vit"]), jax.tree.leaves(params_m["vit"])
  assert all(not np.array_equal(a, b) for a, b in zip(online, momentum))
  loaded = lambda t: {k: v for k, v in t.items() if kind == "pretrain" or k != "cls"}
  online = jax.tree.leaves(loaded(params["bert"]))
  momentum = jax.tree.leaves(loaded(params_m["bert"]))
  assert all(not np.array_equal(a, b) for a, b in zip(online, momentum))
  np.testing.assert_array_equal(params_m["vit"]["norm"]["scale"], sd["visual_encoder_m.norm.weight"])

  if kind == "pretrain":
    np.testing.assert_array_equal(params["bert"]["cls"]["predictions"]["bias"],
                                  sd["text_encoder.cls.predictions.bias"])
    assert report.initialised == []
  else:  # No MLM head in a retrieval checkpoint: fresh, and said so; the momentum copy starts
    # equal to the online head, as ALBEF's copy_params does.
    assert report.initialised == ["params/bert/cls", "params_m/bert/cls"]
    jax.tree.map(np.testing.assert_array_equal, params["bert"]["cls"], params_m["bert"]["cls"])

  # Queues: ALBEF's [E, Q] become [Q, E]; the pointer an int32 scalar; ids [Q].
  np.testing.assert_array_equal(queues["image_queue"], sd["image_queue"].T)
  np.testing.assert_array_equal(queues["text_queue"], sd["text_queue"].T)
  assert queues["queue_ptr"].dtype == np.int32 and int(queues["queue_ptr"]) == 4
  if kind == "retrieval":
    assert queues["idx_queue"].shape == (Q,) and queues["idx_queue"].dtype == np.int32
  else:
    assert "idx_queue" not in queues

  # The converted trees run in our modules.
  cfg = config.model
  tokens = VisionTransformer(cfg.vit, scan_layers=scan).apply({"params": out["params"]["vit"]},
                                                              jnp.zeros((1, 48, 48, 3)))
  ids = jnp.ones((1, 4), jnp.int32)
  fused = BertModel(cfg.bert, scan_layers=scan).apply({"params": out["params"]["bert"]}, ids, ids,
                                                      tokens)
  assert fused.shape == (1, 4, DT) and bool(jnp.isfinite(fused).all())


@pytest.mark.parametrize("source", ["deit", "bert", "nas_albef:pretrain"])
def test_stacked_and_per_layer_conversions_are_the_same_numbers(source):
  """`model.scan_layers` only changes the layout: stacking the per-layer conversion gives the
  stacked one exactly (layer i of a stack = PyTorch's layer i, fusion layers after the text
  layers), and unstacking undoes it."""
  stacked, _ = _convert(source, tiny_config(scan_layers=True))
  per_layer, _ = _convert(source, tiny_config(scan_layers=False))
  flat = convert._flatten(per_layer)
  assert not any(("/blocks/" in k or "_layers/" in k) for k in flat)
  assert any("/blocks_1/" in k or "/layer_3/" in k for k in flat)
  for got, want in ((layer_stack.stack_layers(per_layer, tiny_config()), stacked),
                    (layer_stack.unstack_layers(stacked), per_layer),
                    (convert.model_layout(per_layer, tiny_config()), stacked),
                    (convert.model_layout(stacked, tiny_config(scan_layers=False)), per_layer)):
    got, want = convert._flatten(got), convert._flatten(want)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if source == "bert":
    bert, layer_3 = stacked["params"]["bert"], per_layer["params"]["bert"]["layer_3"]
    np.testing.assert_array_equal(bert["fusion_layers"]["attention"]["query"]["kernel"][1],
                                  layer_3["attention"]["query"]["kernel"])
    assert bert["text_layers"]["output"]["dense"]["kernel"].shape == (FUSION, 2 * DT, DT)


def _convert(source, config):
  """(trees, report) of one conversion of a synthetic checkpoint, as the CLI builds them."""
  report = convert.Report()
  if source == "bert":
    m = Maker(1)
    m.bert("bert.", cross=False)
    m.mlm_head("cls.", "bert.embeddings.word_embeddings.weight")
    trees = {"params": {"bert": convert.convert_bert(m.sd, config, report=report)}}
  elif source == "deit":
    m = Maker(2)
    m.vit("")
    m.linear("head.", DV, 5)
    trees = {"params": {"vit": convert.convert_deit({"model": m.sd}, config, report=report)}}
  else:
    family, kind = source.split(":")
    if family == "albef":
      trees = convert.convert_albef(albef_state_dict(kind, seed=3), config, report=report)
    else:
      trees = convert.convert_nas_albef(nas_state_dict(kind, seed=3), config, report=report)
  return trees, report


SOURCES = ["bert", "deit", "albef:pretrain", "albef:retrieval", "nas_albef:pretrain",
           "nas_albef:retrieval"]


@pytest.mark.parametrize("source", SOURCES)
def test_save_and_load_converted_keep_every_shape_and_dtype(tmp_path, source):
  config = tiny_config(image_size=48)
  trees, report = _convert(source, config)
  out = convert.save_converted(tmp_path / "out", trees, report, config)
  back = convert.load_converted(out)
  flat_a, flat_b = convert._flatten(trees), convert._flatten(back)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    a = np.asarray(flat_a[k])
    assert (a.shape, a.dtype) == (flat_b[k].shape, flat_b[k].dtype), k
    np.testing.assert_array_equal(a, flat_b[k], err_msg=k)
  meta = convert.read_meta(out)
  assert meta["keys"] == len(flat_a)
  assert meta["source"] == source.split(":")[0]
  assert meta["model_config"]["vit"]["hidden_size"] == DV
  if source == "bert":
    assert meta["image_size"] is None
  else:
    assert meta["image_size"] == 48 == meta["model_config"]["vit"]["image_size"]
  if source.startswith(("albef", "nas_albef")):  # The 0-d leaves stay 0-d (the CLI's bug once).
    assert back["params"]["temp"].shape == () and back["params"]["temp"].dtype == np.float32
    assert back["queues"]["queue_ptr"].shape == () and back["queues"]["queue_ptr"].dtype == np.int32
    assert meta["layout"] == "model_" + source.split(":")[1]
  if source.startswith("nas_albef"):
    assert set(back) == {"params", "params_m", "queues", "batch_stats"}
    assert back["batch_stats"]["dictionary"]["codebook"].shape == (M, DV)
  if source == "albef:retrieval":
    assert meta["initialised"] == ["params/bert/cls", "params_m/bert/cls"]
    assert "text_encoder.embeddings.position_ids" in meta["unused"]
    assert back["queues"]["idx_queue"].shape == (Q,)
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    convert.load_converted(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    convert.read_meta(tmp_path)


def test_recorded_model_config_describes_the_checkpoint():
  """ALBEF has no visual dictionary: its model_config says so even from a VD config. NAS_ALBEF's
  says use_dictionary, the checkpoint's dictionary size, gate and input projection."""
  vd_config = tiny_config()
  assert vd_config.model.use_dictionary
  _, report = _convert("albef:pretrain", vd_config)
  assert report.model_config["use_dictionary"] is False
  assert any("no visual dictionary" in n for n in report.notes)

  plain = tiny_config()
  plain.model.use_dictionary = False
  plain.model.dictionary.update(size=2048, gate=False)
  _, report = _convert("nas_albef:pretrain", plain)
  mc = report.model_config
  assert mc["use_dictionary"] is True
  assert (mc["dictionary"]["size"], mc["dictionary"]["gate"], mc["dictionary"]["input_proj"]) == (
      M, True, True)
  assert any("dictionary.size=32" in n and "dictionary.gate=True" in n for n in report.notes)
  assert any("never enqueues" in n for n in report.notes)
  assert plain.model.dictionary.size == 2048  # The caller's config is not modified.


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
def test_nas_albef_tree_fits_the_model_its_config_describes(tmp_path, scan):
  """Every leaf read back from disk has the path and shape of NASModel built from meta.json's
  model_config (temp and queue_ptr 0-d, as the training state's), in either layer layout."""
  from nas_jax.models.nas import NASModel

  config = tiny_config(image_size=48, scan_layers=scan)
  trees, report = _convert("nas_albef:pretrain", config)
  out = convert.save_converted(tmp_path / "nas", trees, report, config)
  trees = convert.load_converted(out)
  model_config = ml_collections.ConfigDict(convert.read_meta(out)["model_config"])
  assert model_config.scan_layers == scan
  res = model_config.vit.image_size
  ids = jnp.zeros((1, 5), jnp.int32)
  variables = jax.eval_shape(NASModel(config=model_config).init, jax.random.key(0),
                             jnp.zeros((1, res, res, 3)), ids, jnp.ones_like(ids))
  expected = _shapes(dict(variables["params"], temp=jnp.zeros(())))
  assert _shapes(trees["params"]) == expected
  assert _shapes(trees["batch_stats"]) == _shapes(variables["batch_stats"])
  momentum = {k: expected[k] for k in ("vit", "bert", "vision_proj", "text_proj")}
  assert _shapes(trees["params_m"]) == momentum
  assert trees["queues"]["queue_ptr"].shape == ()


def test_nas_albef_keys_are_used_or_reported_and_errors_name_them():
  sd = nas_state_dict("pretrain", mask_emb=True)
  report = convert.Report()
  trees = convert.convert_nas_albef(sd, tiny_config(), report=report)
  neck_unused = {k for k in report.unused if k.startswith("neck.")}
  assert neck_unused == {"neck.vq.cluster_size", "neck.vq.cluster_sum", "neck.vq.embed_avg",
                         "neck.mask_emb.weight"}
  assert "EMA" in report.unused["neck.vq.embed_avg"]
  assert "masked" in report.unused["neck.mask_emb.weight"]
  dic = trees["params"]["dictionary"]
  np.testing.assert_array_equal(dic["in_dense"]["kernel"], sd["neck.linear.0.weight"].T)
  np.testing.assert_array_equal(dic["in_norm"]["scale"], sd["neck.linear.1.weight"])
  np.testing.assert_array_equal(dic["out_dense"]["bias"], sd["neck.pos_line.bias"])
  np.testing.assert_array_equal(dic["gate_dense"]["kernel"], sd["neck.gate_fc.0.weight"].T)
  np.testing.assert_array_equal(dic["gate_norm"]["bias"], sd["neck.gate_fc.1.bias"])
  np.testing.assert_array_equal(dic["norm"]["scale"], sd["neck.ln.weight"])
  np.testing.assert_array_equal(trees["batch_stats"]["dictionary"]["codebook"], sd["neck.vq.embed"])
  assert "dictionary" not in trees["params_m"]  # Their neck has no momentum copy.

  missing = {k: v for k, v in sd.items() if k != "neck.gate_fc.0.weight"}
  _error(missing, "'neck.gate_fc.0.weight' is missing", convert.convert_nas_albef)
  no_book = {k: v for k, v in sd.items() if k != "neck.vq.embed"}
  _error(no_book, "'neck.vq.embed' .*is missing", convert.convert_nas_albef)
  narrow = dict(sd, **{"neck.vq.embed": np.zeros((M, DV - 4), np.float32)})
  _error(narrow, r"'neck.vq.embed' has shape \(32, 20\), expected \[m, 24\]", convert.convert_nas_albef)
  begin = dict(sd, **{"neck.begin_line.weight": np.zeros((DV, DV), np.float32)})
  _error(begin, "begin_line.* exists", convert.convert_nas_albef)
  _error(dict(sd, **{"neck.extra": np.zeros(2)}), "unexpected keys .*neck.extra",
         convert.convert_nas_albef)
  _error(sd, "NAS_ALBEF checkpoint, convert it with --source nas_albef")  # convert_albef
  _error(albef_state_dict("pretrain"), "not a NAS_ALBEF checkpoint", convert.convert_nas_albef)


def test_nas_albef_dictionary_matches_the_authors_module_in_torch(run_torch):
  """A random SimpleVDforPreGate state dict (tests/torch_refs/nas_vd_ref.py, their names and math)
  converted and run in our VisualDictionary: input projection, nearest code, straight-through
  value, gate weights, 2-D sine positions, output tokens, the NVA candidates and probabilities;
  the NVA negative where our construction agrees with their HEAD (unreplaced patches), and where
  it deliberately differs (replaced patches: ours mixes in f by the gate, theirs does not)."""
  import flax.linen as nn
  from nas_jax import nva
  from nas_jax.models.dictionary import VisualDictionary, sincos_2d

  b, grid = 2, 4
  n = grid * grid
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(b, n, DV)).astype(np.float32)
  feats[:, 1] = feats[:, 0]          # Patches 0 and 1 share a code: the negative replaces both.
  chosen = np.array([0, 5])
  ref = run_torch("from torch_refs.nas_vd_ref import main\nmain()\n",
                  dict(feats=feats, chosen=chosen, dims=np.array([DV, DV, M]), seed=np.array([0])))

  neck = {"neck." + k[3:]: v for k, v in ref.items() if k.startswith("sd.")}
  report = convert.Report()
  trees = convert.convert_nas_albef({**albef_state_dict("pretrain"), **neck},
                                    tiny_config(image_size=grid * PATCH), report=report)
  variables = {"params": trees["params"]["dictionary"],
               "batch_stats": trees["batch_stats"]["dictionary"]}
  vd = VisualDictionary(size=M, dim=DV, gate=True, input_proj=True)
  x = jnp.asarray(feats)
  aux = vd.apply(variables, x, update=False, method=VisualDictionary.quantize)
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(aux["f"], ref["f"], **tol)
  np.testing.assert_array_equal(aux["codes"], ref["code"])
  assert len(np.unique(ref["code"])) > 4  # Many codes in use: the assignment test means something.
  np.testing.assert_allclose(aux["q"], ref["q"], **tol)

  def gate_weights(m, q, f):
    logits = m.gate_dense(jnp.concatenate([m.out_dense(q), f], -1))
    return jax.nn.softmax(nn.relu(m.gate_norm(logits)), -1)

  np.testing.assert_allclose(vd.apply(variables, aux["q"], aux["f"], method=gate_weights),
                             ref["gate"], **tol)
  np.testing.assert_allclose(sincos_2d((grid, grid), DV), ref["pos"], **tol)
  tokens, _ = vd.apply(variables, x)
  np.testing.assert_allclose(tokens, ref["tokens"], **tol)

  # NVA candidates: theirs are the 2nd..4th nearest codes of a patch feature, ours the 3 nearest
  # codes of its code; the same when the feature is a codebook row (their codebook as input).
  book = variables["batch_stats"]["codebook"]
  idx, dist = nva.nearest_codes(book, 3)
  np.testing.assert_array_equal(idx, ref["book_idx"])
  np.testing.assert_allclose(jax.nn.softmax(nva.replacement_logits(dist, "l2"), -1),
                             ref["book_prob"], **tol)

  # NVA negative for their replacement codes.
  replaced = ref["replaced"]
  assert replaced[0, 0] and replaced[0, 1] and replaced.sum() < b * n
  keep = ~replaced
  for reuse_gate, name in ((True, "neg_gated"), (False, "neg_regated")):
    neg = vd.apply(variables, aux["q"], aux["f"], jnp.asarray(ref["neg_code"]),
                   jnp.asarray(replaced), reuse_gate=reuse_gate,
                   method=VisualDictionary.negative_tokens)
    np.testing.assert_allclose(np.asarray(neg)[keep], ref["neg_head"][keep], **tol)
    np.testing.assert_allclose(neg, ref[name], **tol)           # Ours, in their modules.
    gap = np.abs(np.asarray(neg)[replaced] - ref["neg_head"][replaced]).max()
    assert gap > 1e-2, gap   # Their HEAD leaves the gate out of the replaced patches.


def test_bert_base_layout_with_fresh_cross_attention():
  """bert-base-uncased layout: 'bert.' prefix, old gamma/beta LayerNorm names, pooler, NSP head."""
  m = Maker(1)
  gb = ("gamma", "beta")
  m.bert("bert.", cross=False, ln_names=gb)
  m.linear("bert.pooler.dense.", DT, DT)
  m.mlm_head("cls.", "bert.embeddings.word_embeddings.weight", ln_names=gb)
  m.linear("cls.seq_relationship.", DT, 2)
  config = tiny_config()
  report = convert.Report()
  tree = convert.convert_bert(m.sd, config, seed=7, report=report)
  assert _shapes(tree) == _expected_shapes(config)[1]
  tree = layer_stack.unstack_layers(tree)
  assert report.initialised == [f"params/bert/layer_{i}/crossattention"
                                for i in range(FUSION, BERT_LAYERS)]
  assert set(report.unused) == {"bert.embeddings.position_ids", "bert.pooler.dense.weight",
                                "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                                "cls.seq_relationship.bias"}
  np.testing.assert_array_equal(tree["embeddings"]["LayerNorm"]["scale"],
                                m.sd["bert.embeddings.LayerNorm.gamma"])
  np.testing.assert_array_equal(tree["layer_3"]["attention"]["value"]["kernel"],
                                m.sd["bert.encoder.layer.3.attention.self.value.weight"].T)
  # Fresh cross-attention: BERT's init (N(0, 0.02), zero bias, unit LayerNorm), seeded, per layer.
  cross = tree["layer_2"]["crossattention"]
  assert cross["key"]["kernel"].shape == (DV, DT)
  assert 0.01 < cross["query"]["kernel"].std() < 0.03 and not cross["query"]["bias"].any()
  np.testing.assert_array_equal(cross["output"]["LayerNorm"]["scale"], np.ones(DT))
  assert not np.array_equal(cross["query"]["kernel"], tree["layer_3"]["crossattention"]["query"]["kernel"])
  again = convert.convert_bert(m.sd, config, seed=7)
  np.testing.assert_array_equal(again["fusion_layers"]["crossattention"]["query"]["kernel"][0],
                                cross["query"]["kernel"])
  other = convert.convert_bert(m.sd, config, seed=8)
  assert not np.array_equal(other["fusion_layers"]["crossattention"]["query"]["kernel"][0],
                            cross["query"]["kernel"])


def test_distilled_deit_checkpoint():
  m = Maker(2)
  m.vit("", extra=2)
  m.t("dist_token", 1, 1, DV)
  m.linear("head.", DV, 5)
  m.linear("head_dist.", DV, 5)
  report = convert.Report()
  tree = convert.convert_deit({"model": m.sd}, tiny_config(), report=report)  # As torch.load gives.
  assert set(report.unused) == {"dist_token", "head.weight", "head.bias", "head_dist.weight",
                                "head_dist.bias"}
  pos = m.sd["pos_embed"]
  np.testing.assert_array_equal(tree["pos_embed"], np.concatenate([pos[:, :1], pos[:, 2:]], 1))
  assert any("distillation" in n for n in report.notes)


def _error(sd, match, convert_fn=convert.convert_albef, config=None):
  with pytest.raises((ValueError, KeyError), match=match):
    convert_fn(sd, config or tiny_config())


def test_mismatches_are_errors_naming_the_key():
  sd = albef_state_dict("pretrain")
  bad = dict(sd, **{"text_proj.weight": np.zeros((E, DT + 1), np.float32)})
  _error(bad, r"'text_proj.weight' has shape \(8, 17\), expected \(8, 16\)")
  missing = {k: v for k, v in sd.items() if k != "visual_encoder_m.blocks.1.mlp.fc2.bias"}
  _error(missing, "'visual_encoder_m.blocks.1.mlp.fc2.bias' is missing")
  _error(dict(sd, extra_thing=np.zeros(3)), "unexpected keys .*extra_thing")
  untied = dict(sd, **{"text_encoder.cls.predictions.decoder.weight":
                       sd["text_encoder.cls.predictions.decoder.weight"] + 1})
  _error(untied, "decoder.weight differs from text_encoder.bert.embeddings.word_embeddings")
  queue = dict(sd, image_queue=np.zeros((Q, E), np.float32))
  _error(queue, r"'image_queue' has shape \(12, 8\), expected \[embed_dim=8, Q\]")
  later = tiny_config()
  later.model.bert.fusion_layer = 3
  _error(sd, "crossattention.* exists but config bert.fusion_layer=3", config=later)
  deeper = tiny_config()
  deeper.model.vit.num_layers = 3
  _error(sd, "has 2 blocks, config vit.num_layers=3", config=deeper)


def test_reading_files(tmp_path, monkeypatch):
  import safetensors.numpy
  sd = albef_state_dict("retrieval")
  path = tmp_path / "albef.safetensors"
  safetensors.numpy.save_file(sd, str(path))
  out = convert.convert_albef(path, tiny_config())
  np.testing.assert_array_equal(out["params"]["text_proj"]["bias"], sd["text_proj.bias"])
  with pytest.raises(FileNotFoundError, match="does not exist: download it first"):
    convert.load_state_dict(tmp_path / "nope.pth")
  (tmp_path / "model.pth").write_bytes(b"not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # As if torch were not installed.
  with pytest.raises(ImportError, match=r"needs PyTorch.*pip install 'nas_jax\[torch\]'"):
    convert.load_state_dict(tmp_path / "model.pth")
  (tmp_path / "model.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.load_state_dict(tmp_path / "model.h5")


def test_cli_help_documents_the_four_sources():
  proc = subprocess.run([sys.executable, "-m", "nas_jax.convert", "--help"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout
  for source in ("bert ", "deit ", "albef ", "nas_albef "):
    assert f"\n  {source}" in text, source
  for words in ("bert-base-uncased", "deit_base_patch16_224", "model_pretrain", "model_retrieval",
                "--image_size", "nas_jax[torch]", "--config", "SimpleVDforPreGate",
                "use_dictionary: False", "download.pytorch.org/whl/cpu", "safetensors.torch.save_file"):
    assert words in text, words


def _tiny_config_file(tmp_path) -> pathlib.Path:
  """A config file (configs/X.py[:arg] style) giving tiny_config(arg)."""
  cfg_file = tmp_path / "tiny.py"
  cfg_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
      "from test_convert import tiny_config\n"
      "def get_config(arg=None):\n"
      "  return tiny_config(int(arg) if arg else 32)\n")
  return cfg_file


def _cli_without_torch(tmp_path, *args):
  """Runs the CLI in a fresh interpreter where `import torch` fails, as on a machine without it."""
  site = tmp_path / "no_torch"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
  return subprocess.run([sys.executable, "-m", "nas_jax.convert", *args], capture_output=True,
                        text=True, timeout=120, env=env, cwd=tmp_path)


def test_cli_reading_a_pth_without_torch_is_one_line_saying_what_to_do(tmp_path):
  ckpt = tmp_path / "ALBEF_4M.pth"
  ckpt.write_bytes(b"a pickled torch file")
  proc = _cli_without_torch(tmp_path, "--source", "albef", "--ckpt", str(ckpt), "--out",
                            str(tmp_path / "out"))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  line = lines[0]
  assert line.startswith(f"error: reading {ckpt} needs PyTorch")
  assert "`pip install torch --index-url https://download.pytorch.org/whl/cpu`" in line
  assert "`pip install 'nas_jax[torch]'`" in line
  snippet = convert.safetensors_snippet(str(ckpt)).replace("\n", "; ")
  assert f'`python -c "{snippet}"`' in line
  assert str(tmp_path / "ALBEF_4M.safetensors") in snippet
  assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
  import safetensors.numpy
  ckpt = tmp_path / "nas.safetensors"
  sd = nas_state_dict("pretrain")
  del sd["neck.pos_line.weight"]
  safetensors.numpy.save_file(sd, str(ckpt))
  for args, expected in (
      (["--source", "nas_albef", "--ckpt", str(ckpt), "--config", str(_tiny_config_file(tmp_path))],
       "'neck.pos_line.weight' is missing"),
      (["--source", "deit", "--ckpt", str(tmp_path / "nope.pth")], "does not exist"),
  ):
    proc = _cli_without_torch(tmp_path, *args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert expected in proc.stderr


def test_the_safetensors_snippet_converts_a_pth_in_the_torch_venv(run_torch, tmp_path):
  """The two lines the error message gives, run where torch is: a {'model': ...} checkpoint with a
  tied (shared-memory) tensor and a bfloat16 one becomes a .safetensors we read without torch."""
  pth = str(tmp_path / "ckpt.pth")
  script = f"""
import sys, torch
word = torch.arange(6.).reshape(2, 3)
sd = {{"emb.weight": word, "decoder.weight": word, "half": torch.tensor([1.5], dtype=torch.bfloat16),
      "queue_ptr": torch.tensor([3])}}
torch.save({{"model": sd, "epoch": 2}}, {pth!r})
exec({convert.safetensors_snippet(pth)!r})
import numpy as np
np.savez(sys.argv[2])
"""
  run_torch(script)
  loaded = convert.load_state_dict(tmp_path / "ckpt.safetensors")
  assert sorted(loaded) == ["decoder.weight", "emb.weight", "half", "queue_ptr"]
  np.testing.assert_array_equal(loaded["decoder.weight"], np.arange(6.0).reshape(2, 3))
  assert loaded["half"].dtype == np.float32 and loaded["half"][0] == 1.5
  assert loaded["queue_ptr"].dtype == np.int64


def test_cli_end_to_end(tmp_path, capsys):
  import safetensors.numpy
  ckpt = tmp_path / "albef.safetensors"
  safetensors.numpy.save_file(albef_state_dict("pretrain"), str(ckpt))
  cfg_file = _tiny_config_file(tmp_path)
  assert convert.main(["--source", "albef", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
                       "--config", f"{cfg_file}:32", "--image_size", "64"]) == 0
  printed = capsys.readouterr().out
  assert "model_pretrain" in printed and "resampled" in printed and "position_ids" in printed
  assert "model_config: use_dictionary=False, image_size=64" in printed
  back = convert.load_converted(tmp_path / "out")
  assert back["params"]["vit"]["pos_embed"].shape == (1, 1 + 16, DV)
  assert back["queues"]["image_queue"].shape == (Q, E)
  assert convert.read_meta(tmp_path / "out")["image_size"] == 64

  nas = tmp_path / "nas.safetensors"
  safetensors.numpy.save_file(nas_state_dict("retrieval", mask_emb=True), str(nas))
  assert convert.main(["--source", "nas_albef", "--ckpt", str(nas), "--out", str(tmp_path / "nas"),
                       "--config", f"{cfg_file}:32"]) == 0
  printed = capsys.readouterr().out
  assert "model_retrieval" in printed and "batch_stats/dictionary" in printed
  assert "mask_emb.weight" in printed and "neck.vq.embed_avg" in printed
  assert "model_config: use_dictionary=True, image_size=32" in printed
  assert convert.load_converted(tmp_path / "nas")["batch_stats"]["dictionary"]["codebook"].shape == (M, DV)


def test_reading_pytorch_files_in_the_torch_venv(run_torch, tmp_path):
  """load_state_dict on real torch.save files (ALBEF/DeiT-style {'model': ...} with extra entries,
  a bare HF .bin, a bfloat16 tensor), run where torch is installed; numpy is all it returns."""
  script = f"""
import sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[1])!r})
import numpy as np, torch
from nas_jax.convert import load_state_dict
d = {str(tmp_path)!r}
sd = {{"a.weight": torch.arange(6.).reshape(2, 3), "b": torch.tensor([1.5], dtype=torch.bfloat16),
      "queue_ptr": torch.zeros(1, dtype=torch.long)}}
torch.save({{"model": sd, "epoch": 3, "config": {{"lr": 1e-4}}}}, d + "/ckpt.pth")
torch.save(sd, d + "/pytorch_model.bin")
out = {{}}
for name in ("ckpt.pth", "pytorch_model.bin"):
  loaded = load_state_dict(d + "/" + name)
  assert sorted(loaded) == ["a.weight", "b", "queue_ptr"], loaded.keys()
  assert all(isinstance(v, np.ndarray) for v in loaded.values())
  for k, v in loaded.items():
    out[name + ":" + k] = v
np.savez(sys.argv[2], **out)
"""
  out = run_torch(script)
  for name in ("ckpt.pth", "pytorch_model.bin"):
    np.testing.assert_array_equal(out[f"{name}:a.weight"], np.arange(6.0).reshape(2, 3))
    assert out[f"{name}:b"].dtype == np.float32 and out[f"{name}:b"][0] == 1.5
    assert out[f"{name}:queue_ptr"].dtype == np.int64


def test_readme_and_docs_give_the_snippet_the_error_gives():
  snippet = convert.safetensors_snippet("ALBEF_4M.pth")
  readme = (ROOT / "README.md").read_text()
  docs = (ROOT / "docs" / "CONVERT.md").read_text()
  for text in (readme, docs):
    assert snippet in text
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
  albef = [l for l in readme.splitlines() if "--source albef" in l]
  assert albef and all("--image_size 384" in l for l in albef)
