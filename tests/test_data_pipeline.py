"""grain pipeline: batch contract, determinism, per-process shards, exact resume, bad records."""

import numpy as np
import pytest

from nas_jax import config_lib
from nas_jax.data import pipeline, sources, text
from nas_jax.data.text import pre_caption
from nas_jax.data.transforms import swap_left_right
from test_data_fixtures import make_albef_corpus, make_negclip_images


def _config(**data):
  c = config_lib.base_config()
  c.data.batch_size = 4
  c.data.image_size = 32
  c.data.max_text_len = 16
  c.data.read_threads = 2
  c.data.prefetch = 2
  c.data.synthetic.num_train = 16
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope="module")
def tok():
  return text.load_tokenizer("synthetic")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_synthetic_batches_follow_the_contract(tok):
  c = _config()
  c.itm.text_negatives = True
  batch = next(pipeline.make_train_iterator(c, tok, process_index=1, process_count=2))
  spec = pipeline.batch_spec(c)
  assert batch.keys() == spec.keys()
  for k, s in spec.items():   # Host-local: the global batch split over 2 processes.
    assert batch[k].shape == (s.shape[0] // 2,) + s.shape[1:], k
    assert batch[k].dtype == s.dtype, k
  assert spec["image"].shape == (4, 32, 32, 3)
  lo, hi = (0 - 0.48145466) / 0.26862954, (1 - 0.40821073) / 0.27577711
  assert lo - 1e-4 <= batch["image"].min() and batch["image"].max() <= hi + 1e-3
  assert (batch["text_ids"][:, 0] == tok.cls_id).all()
  assert (batch["text_mask"].sum(1) >= 3).all()
  assert not any(k.startswith("_") for k in batch)
  c.itm.text_negatives = False
  assert "neg_text_ids" not in pipeline.batch_spec(c)


def test_batch_size_must_divide_over_processes(tok):
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
    pipeline.make_train_iterator(_config(), tok, process_index=0, process_count=3)


def test_same_seed_same_batches_other_seed_other_batches(tok):
  c = _config()
  a = _take(pipeline.make_train_iterator(c, tok), 2)
  b = _take(pipeline.make_train_iterator(c, tok), 2)
  d = _take(pipeline.make_train_iterator(c, tok, seed=1), 2)
  assert all(_equal(x, y) for x, y in zip(a, b))
  assert not _equal(a[0], d[0])


def test_processes_get_disjoint_shards_covering_the_corpus(tok):
  c = _config()   # 16 synthetic records, image_id = record index; 2 processes x 2 per batch.
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(c, tok, process_index=p, process_count=2, num_epochs=1)
    ids = np.concatenate([b["image_id"] for b in it])
    assert len(ids) == 8
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(16))


def test_epochs_are_reshuffled_and_complete(tok):
  it = pipeline.make_train_iterator(_config(), tok, num_epochs=2)
  ids = np.concatenate([b["image_id"] for b in it])
  assert len(ids) == 32
  assert sorted(ids[:16]) == sorted(ids[16:]) == list(range(16))
  assert not np.array_equal(ids[:16], ids[16:])


def test_restored_state_gives_exactly_the_next_batch(tok):
  c = _config()
  it = pipeline.make_train_iterator(c, tok)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = pipeline.make_train_iterator(c, tok)
  fresh.set_state(state)
  assert all(_equal(x, y) for x, y in zip(expected, _take(fresh, 2)))


def test_orbax_checkpoint_of_the_iterator_resumes(tok, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  c = _config()
  it = pipeline.make_train_iterator(c, tok)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = pipeline.make_train_iterator(c, tok)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _equal(expected, next(fresh))


def test_worker_processes_give_the_same_batches_as_in_process(tok):
  c = _config()
  expected = _take(pipeline.make_train_iterator(c, tok), 3)
  c.data.num_workers = 2
  it = pipeline.make_train_iterator(c, tok)
  try:
    got = _take(it, 3)
  finally:
    it.close()
  assert all(_equal(x, y) for x, y in zip(expected, got))


# ------------------------------------------------------------------------------ ALBEF json corpus

class _RecordingTokenizer:
  """The real tokenizer, remembering every text it was given (to check captions, not ids)."""

  def __init__(self, tok):
    self.tok, self.texts = tok, []

  def __call__(self, texts, max_len):
    self.texts.append(list(texts))
    return self.tok(texts, max_len)


def _albef_config(corpus, **data):
  return _config(source="albef_json", paths=(corpus["json"],), image_root=corpus["image_root"],
                 **data)


def test_albef_corpus_bad_records_are_replaced_counted_and_deterministic(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path)
  c = _albef_config(corpus, max_error_rate=1.0)
  rec = _RecordingTokenizer(tok)
  ds, maker = pipeline.make_dataset(c, rec, num_epochs=1)
  batches = [ds[i] for i in range(len(ds))]
  n = corpus["num_good"] + corpus["num_bad"]
  assert len(batches) == n // 4
  # Every bad record read was counted (each read once as itself, replacements may hit more).
  assert maker.errors >= corpus["num_bad"] - n % 4
  assert maker.records == sum(len(b["image_id"]) for b in batches) + maker.errors
  reasons = "\n".join(maker.examples)
  for path, why in [("corrupt.jpg", "unreadable image"), ("truncated.jpg", "truncated"),
                    ("missing.jpg", "file not found"), ("fine_but_bad_caption.jpg", "caption")]:
    if any(path in e for e in maker.examples):
      assert why in reasons, (path, reasons)
  # Replaced samples are good ones: every caption that reached the tokenizer is a real caption.
  good = {pre_caption(ca) for r in corpus["records"][:corpus["num_good"]]
          for ca in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]]) if ca}
  assert all(t[0] in good or swap_left_right(t[0]) in good for t in rec.texts)   # (flips)
  assert sum(int((b["_replaced"] > 0).sum()) for b in batches) >= 1
  ds2, _ = pipeline.make_dataset(c, tok, num_epochs=1)
  assert all(_equal(batches[i], ds2[i]) for i in range(len(ds2)))


def test_same_image_records_share_image_id(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path)
  src = sources.AlbefJsonSource([corpus["json"]], corpus["image_root"])
  ids = [src[i]["image_id"] for i in range(len(src))]
  assert ids[-1] == ids[-2]                    # Both bad-caption records point at one file.
  assert len(set(ids)) == len(src) - 1 and sorted(set(ids)) == list(range(len(src) - 1))


def test_caption_lists_draw_one_valid_caption_per_epoch(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path)
  c = _albef_config(corpus, max_error_rate=1.0)
  rec = _RecordingTokenizer(tok)
  ds, maker = pipeline.make_dataset(c, rec, num_epochs=None)
  # Record 1 has captions ['caption a of picture 1', 'caption b of picture 1', '']; over many
  # epochs both valid ones are drawn, never the empty one, and a given epoch is reproducible.
  drawn = set()
  for epoch in range(12):
    rec.texts.clear()
    maker((epoch, 1))
    maker((epoch, 1))
    assert rec.texts[0] == rec.texts[1]
    drawn.add(rec.texts[0][0])
  assert drawn == {"caption a of picture 1", "caption b of picture 1"}


def test_error_rate_past_the_bound_stops_with_example_paths(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path, num_good=2)
  c = _albef_config(corpus, max_error_rate=0.2, error_rate_min_records=5)
  ds, _ = pipeline.make_dataset(c, tok, num_epochs=1)
  with pytest.raises(pipeline.DataErrorRateExceeded,
                     match=r"(?s)max_error_rate=20.0%.*examples:.*\.jpg"):
    for i in range(len(ds)):
      ds[i]


def test_wrong_image_root_stops_quickly_with_a_hint(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path, num_good=2)
  c = _albef_config(corpus)
  c.data.image_root = str(tmp_path / "nowhere")
  ds, _ = pipeline.make_dataset(c, tok)
  with pytest.raises(pipeline.DataErrorRateExceeded, match="(?s)in a row.*nowhere.*image_root"):
    ds[0]


def test_text_negatives_need_a_source_that_has_them(tmp_path, tok):
  corpus = make_albef_corpus(tmp_path, num_good=2)
  c = _albef_config(corpus)
  c.itm.text_negatives = True
  with pytest.raises(ValueError, match="no text hard negatives.*negclip_tsv"):
    pipeline.make_train_iterator(c, tok)


# ------------------------------------------------------------------------------ NegCLIP

def test_negclip_sample_gives_pairs_with_a_hard_negative(samples_dir, tmp_path, tok):
  tsv = samples_dir / "NegCLIP" / "valid_neg_clip.sample.tsv"
  make_negclip_images(tsv, tmp_path)
  c = _config(source="negclip_tsv", paths=(str(tsv),), image_root=str(tmp_path))
  c.itm.text_negatives = True
  src = sources.make_source(c)
  rec = _RecordingTokenizer(tok)
  ds, maker = pipeline.make_dataset(c, rec, num_epochs=1)
  batch = ds[0]
  assert batch["neg_text_ids"].shape == batch["text_ids"].shape == (4, 16)
  assert maker.errors == 0
  rows = {pre_caption(src[i]["captions"][0]): [pre_caption(n) for n in src[i]["neg_captions"]]
          for i in range(len(src))}
  for pos, neg in rec.texts:
    negs = rows.get(pos) or rows[swap_left_right(pos)]   # A flip may have swapped both.
    assert neg in negs or swap_left_right(neg) in negs
  ids, mask = tok(rec.texts[-1], 16)
  np.testing.assert_array_equal(batch["neg_text_ids"][-1], ids[1])
  np.testing.assert_array_equal(batch["text_mask"][-1], mask[0])


def test_uint8_images_are_the_float_batch_before_normalisation(tok):
  import jax.numpy as jnp
  from nas_jax.data import transforms
  c = _config()
  floats = next(pipeline.make_train_iterator(c, tok))
  c.data.image_dtype = "uint8"
  raw = next(pipeline.make_train_iterator(c, tok))
  assert raw["image"].dtype == np.uint8 and pipeline.batch_spec(c)["image"].dtype == np.uint8
  np.testing.assert_allclose(np.asarray(transforms.normalize_jax(jnp.asarray(raw["image"]))),
                             floats["image"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(raw["text_ids"], floats["text_ids"])


def test_device_prefetch_runs_ahead_but_checkpoints_the_consumed_position(tok, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  c = _config()
  puts = []

  def put(batch):
    puts.append(int(batch["image_id"][0]))
    return dict(batch)

  it = pipeline.DevicePrefetch(pipeline.make_train_iterator(c, tok), put, size=2)
  first = _take(it, 2)
  assert len(puts) == 4                      # Two returned, two more already transferred.
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  plain = _take(pipeline.make_train_iterator(c, tok), 4)
  assert all(_equal(x, y) for x, y in zip(first + expected, plain))
  fresh = pipeline.DevicePrefetch(pipeline.make_train_iterator(c, tok), dict, size=3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert all(_equal(x, y) for x, y in zip(expected, _take(fresh, 2)))
  finite = pipeline.DevicePrefetch(pipeline.make_train_iterator(c, tok, num_epochs=1), dict)
  assert len(list(finite)) == 4              # 16 records / batch 4, then StopIteration.


def test_processes_batches_stack_into_the_one_process_batch(tok):
  """Process p's local batch j is rows [p·b, (p+1)·b) of the one-process global batch j: runs on
  1 and on 2 hosts see the same global batches in the same row order."""
  c = _config()
  whole = _take(pipeline.make_train_iterator(c, tok), 3)
  parts = [_take(pipeline.make_train_iterator(c, tok, process_index=p, process_count=2), 3)
           for p in range(2)]
  for j in range(3):
    for k in whole[j]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][j][k], parts[1][j][k]]), whole[j][k], err_msg=f"batch {j} {k}")
