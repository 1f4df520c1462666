"""Checkpoint conversion: synthetic state dicts with every key ALBEF / HF BERT / DeiT have (tiny
shapes) round-trip into our trees; every key is accounted for; mismatches are errors naming keys."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nas_jax import config_lib, convert
from nas_jax.models.bert import BertModel
from nas_jax.models.vit import VisionTransformer

DV, DT, E, Q = 24, 16, 8, 12          # vision width, text width, ITC embed dim, queue size
PATCH, SRC_RES, VIT_LAYERS, BERT_LAYERS, FUSION, VOCAB, MAX_POS = 16, 32, 2, 4, 2, 30, 12


def tiny_config(image_size=SRC_RES):
  c = config_lib.base_config()
  c.model.vit.update(image_size=image_size, patch_size=PATCH, hidden_size=DV,
                     num_layers=VIT_LAYERS, num_heads=2, mlp_dim=2 * DV)
  c.model.bert.update(vocab_size=VOCAB, hidden_size=DT, num_layers=BERT_LAYERS,
                      fusion_layer=FUSION, num_heads=2, intermediate_size=2 * DT,
                      max_position_embeddings=MAX_POS)
  c.model.embed_dim = E
  return c


class Maker:
  """Random tensors with the shapes PyTorch stores (Linear weight [out, in])."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.sd = {}

  def t(self, key, *shape):
    self.sd[key] = self.rng.normal(size=shape).astype(np.float32)

  def linear(self, prefix, n_in, n_out):
    self.t(prefix + "weight", n_out, n_in)
    self.t(prefix + "bias", n_out)

  def norm(self, prefix, n, names=("weight", "bias")):
    self.t(prefix + names[0], n)
    self.t(prefix + names[1], n)

  def vit(self, p, grid=SRC_RES // PATCH, extra=1):
    self.t(p + "cls_token", 1, 1, DV)
    self.t(p + "pos_embed", 1, extra + grid * grid, DV)
    self.t(p + "patch_embed.proj.weight", DV, 3, PATCH, PATCH)
    self.t(p + "patch_embed.proj.bias", DV)
    for i in range(VIT_LAYERS):
      b = f"{p}blocks.{i}."
      self.norm(b + "norm1.", DV)
      self.linear(b + "attn.qkv.", DV, 3 * DV)
      self.linear(b + "attn.proj.", DV, DV)
      self.norm(b + "norm2.", DV)
      self.linear(b + "mlp.fc1.", DV, 2 * DV)
      self.linear(b + "mlp.fc2.", 2 * DV, DV)
    self.norm(p + "norm.", DV)

  def attention(self, p, kv_width, ln_names):
    self.linear(p + "self.query.", DT, DT)
    self.linear(p + "self.key.", kv_width, DT)
    self.linear(p + "self.value.", kv_width, DT)
    self.linear(p + "output.dense.", DT, DT)
    self.norm(p + "output.LayerNorm.", DT, ln_names)

  def bert(self, p, cross=True, ln_names=("weight", "bias")):
    e = p + "embeddings."
    self.sd[e + "position_ids"] = np.arange(MAX_POS, dtype=np.int64)[None]
    self.t(e + "word_embeddings.weight", VOCAB, DT)
    self.t(e + "position_embeddings.weight", MAX_POS, DT)
    self.t(e + "token_type_embeddings.weight", 2, DT)
    self.norm(e + "LayerNorm.", DT, ln_names)
    for i in range(BERT_LAYERS):
      l = f"{p}encoder.layer.{i}."
      self.attention(l + "attention.", DT, ln_names)
      if cross and i >= FUSION:
        self.attention(l + "crossattention.", DV, ln_names)
      self.linear(l + "intermediate.dense.", DT, 2 * DT)
      self.linear(l + "output.dense.", 2 * DT, DT)
      self.norm(l + "output.LayerNorm.", DT, ln_names)

  def mlm_head(self, p, word_key, ln_names=("weight", "bias")):
    c = p + "predictions."
    self.t(c + "bias", VOCAB)
    self.linear(c + "transform.dense.", DT, DT)
    self.norm(c + "transform.LayerNorm.", DT, ln_names)
    self.sd[c + "decoder.weight"] = self.sd[word_key].copy()   # Tied.
    self.sd[c + "decoder.bias"] = self.sd[c + "bias"].copy()


def albef_state_dict(kind: str, seed: int = 0) -> dict:
  """Every key of salesforce/ALBEF's model_pretrain / model_retrieval state dict, tiny shapes."""
  m = Maker(seed)
  for tag in ("", "_m"):
    m.vit(f"visual_encoder{tag}.")
    if kind == "pretrain":   # text_encoder = BertForMaskedLM (no pooler)
      m.bert(f"text_encoder{tag}.bert.")
      m.mlm_head(f"text_encoder{tag}.cls.", f"text_encoder{tag}.bert.embeddings.word_embeddings.weight")
    else:                    # text_encoder = BertModel(add_pooling_layer=False)
      m.bert(f"text_encoder{tag}.")
    m.linear(f"vision_proj{tag}.", DV, E)
    m.linear(f"text_proj{tag}.", DT, E)
  m.linear("itm_head.", DT, 2)
  m.sd["temp"] = np.array(0.07, np.float32)
  m.t("image_queue", E, Q)
  m.t("text_queue", E, Q)
  m.sd["queue_ptr"] = np.array([4], np.int64)
  if kind == "retrieval":
    m.sd["idx_queue"] = np.arange(Q, dtype=np.int64)[None] - 100
  return m.sd


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _expected_shapes(config):
  vit = jax.eval_shape(VisionTransformer(config.model.vit).init, jax.random.key(0),
                       jnp.zeros((1, config.model.vit.image_size, config.model.vit.image_size, 3)))
  ids = jnp.zeros((1, 3), jnp.int32)
  bert = jax.eval_shape(BertModel(config.model.bert).init, jax.random.key(0), ids, ids,
                        jnp.zeros((1, 2, DV)))
  return _shapes(vit["params"]), _shapes(bert["params"])


@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
def test_albef_round_trip(kind):
  sd = albef_state_dict(kind)
  config = tiny_config(image_size=48)  # 2x2 -> 3x3 patches: the position embedding is resampled.
  report = convert.Report()
  out = convert.convert_albef(sd, config, report=report)
  params, params_m, queues = out["params"], out["params_m"], out["queues"]
  assert report.layout == f"model_{kind}"

  # Every key consumed; only the position-id buffers are left over, and they are reported.
  assert set(report.unused) == {k for k in sd if k.endswith("position_ids")}
  assert set(params) == {"vit", "bert", "vision_proj", "text_proj", "itm_head", "temp"}
  assert set(params_m) == {"vit", "bert", "vision_proj", "text_proj"}

  vit_shapes, bert_shapes = _expected_shapes(config)
  for tree in (params, params_m):
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
  tokens = VisionTransformer(cfg.vit).apply({"params": params["vit"]}, jnp.zeros((1, 48, 48, 3)))
  ids = jnp.ones((1, 4), jnp.int32)
  fused = BertModel(cfg.bert).apply({"params": params["bert"]}, ids, ids, tokens)
  assert fused.shape == (1, 4, DT) and bool(jnp.isfinite(fused).all())


def test_save_and_load_converted(tmp_path):
  config = tiny_config()
  report = convert.Report()
  trees = convert.convert_albef(albef_state_dict("retrieval", seed=3), config, report=report)
  out = convert.save_converted(tmp_path / "albef", trees, report, config)
  back = convert.load_converted(out)
  flat_a, flat_b = convert._flatten(trees), convert._flatten(back)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    assert np.asarray(flat_a[k]).dtype == flat_b[k].dtype, k
  assert "params/bert/layer_2/crossattention/key/kernel" in flat_b
  meta = convert.read_meta(out)
  assert meta["source"] == "albef" and meta["layout"] == "model_retrieval"
  assert meta["initialised"] == ["params/bert/cls", "params_m/bert/cls"]
  assert "text_encoder.embeddings.position_ids" in meta["unused"]
  assert meta["model_config"]["vit"]["hidden_size"] == DV
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    convert.load_converted(tmp_path)


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
  np.testing.assert_array_equal(again["layer_2"]["crossattention"]["query"]["kernel"],
                                cross["query"]["kernel"])
  other = convert.convert_bert(m.sd, config, seed=8)
  assert not np.array_equal(other["layer_2"]["crossattention"]["query"]["kernel"],
                            cross["query"]["kernel"])


def test_distilled_deit_checkpoint():
  m = Maker(2)
  m.vit("", grid=2, extra=2)
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


def test_cli_help_documents_the_three_sources():
  proc = subprocess.run([sys.executable, "-m", "nas_jax.convert", "--help"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout
  for source in ("bert ", "deit ", "albef "):
    assert f"\n  {source}" in text, source
  for words in ("bert-base-uncased", "deit_base_patch16_224", "model_pretrain", "model_retrieval",
                "--image_size", "nas_jax[torch]", "--config"):
    assert words in text, words


def test_cli_end_to_end(tmp_path, capsys):
  import safetensors.numpy
  ckpt = tmp_path / "albef.safetensors"
  safetensors.numpy.save_file(albef_state_dict("pretrain"), str(ckpt))
  cfg_file = tmp_path / "tiny.py"
  cfg_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
      "from test_convert import tiny_config\n"
      "def get_config(arg=None):\n"
      "  return tiny_config(int(arg) if arg else 32)\n")
  assert convert.main(["--source", "albef", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
                       "--config", f"{cfg_file}:32", "--image_size", "64"]) == 0
  printed = capsys.readouterr().out
  assert "model_pretrain" in printed and "resampled" in printed and "position_ids" in printed
  back = convert.load_converted(tmp_path / "out")
  assert back["params"]["vit"]["pos_embed"].shape == (1, 1 + 16, DV)
  assert back["queues"]["image_queue"].shape == (Q, E)


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
