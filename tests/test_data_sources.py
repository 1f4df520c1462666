"""Sources: ALBEF json (one or several files, retrieval image_id), NegCLIP TSV, format errors."""

import csv
import json
import pickle

import numpy as np
import pytest

from nas_jax import config_lib
from nas_jax.data import sources


def test_albef_test_sample_reads_with_image_root(samples_dir):
  path = samples_dir / "ALBEF" / "coco_test.sample.json"
  src = sources.AlbefJsonSource([str(path)], "/data/coco")
  raw = json.loads(path.read_text())
  assert len(src) == len(raw) == 6
  r0 = src[0]
  assert r0["image"] == "/data/coco/val2014/COCO_val2014_000000391895.jpg"
  assert r0["captions"] == raw[0]["caption"] and len(r0["captions"]) == 5
  assert len(src[5]["captions"]) == 6          # Record 83: one of the images with 6 captions.
  assert [src[i]["image_id"] for i in range(6)] == list(range(6))
  assert src[0]["neg_captions"] == []


def test_several_files_mix_into_one_corpus_with_retrieval_image_ids(tmp_path):
  a = tmp_path / "a.json"
  b = tmp_path / "b.json"
  a.write_text(json.dumps([{"image": "x.jpg", "caption": "one", "image_id": "coco_9"},
                           {"image": "x.jpg", "caption": "two", "image_id": "coco_9"},
                           {"image": "y.jpg", "caption": "three", "image_id": "coco_4"}]))
  b.write_text(json.dumps([{"image": "/abs/z.jpg", "caption": ["four", 5, None]},
                           {"image": "w.jpg", "caption": "five", "image_id": "coco_4"}]))
  src = sources.AlbefJsonSource([str(a), str(b)], "root")
  assert len(src) == 5
  assert [src[i]["image_id"] for i in range(5)] == [0, 0, 1, 2, 1]
  assert src[3]["image"] == "/abs/z.jpg"               # Absolute paths ignore image_root.
  assert src[3]["captions"] == ["four", "", ""]        # Non-strings kept as '' (counted later).
  assert src[1]["image"] == "root/x.jpg"
  src2 = pickle.loads(pickle.dumps(src))
  assert [src2[i] for i in range(5)] == [src[i] for i in range(5)]


@pytest.mark.parametrize("content,match", [
    ('{"image": "a.jpg", "caption": "x"}', r"top level is a dict, expected a JSON list"),
    ('[{"image": "a.jpg", "caption": "x"}, ["b.jpg", "y"]]', r"record 1 is a list"),
    ('[{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]', r'record 1 has no "image"'),
    ('[{"image": "a.jpg"}]', r'record 0 has no "caption"'),
    ('[{"image": "a.jpg", "caption": "x"}', r"not valid JSON"),
])
def test_json_that_is_not_a_list_of_records_names_file_and_record(tmp_path, content, match):
  p = tmp_path / "bad.json"
  p.write_text(content)
  with pytest.raises(sources.DataFormatError, match=match) as e:
    sources.AlbefJsonSource([str(p)])
  assert str(p) in str(e.value)


def test_missing_annotation_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json.*config.data.paths"):
    sources.AlbefJsonSource([str(tmp_path / "nope.json")])
  with pytest.raises(ValueError, match="at least one file"):
    sources.AlbefJsonSource([])


def test_negclip_sample_tsv(samples_dir):
  tsv = samples_dir / "NegCLIP" / "valid_neg_clip.sample.tsv"
  src = sources.NegClipTsvSource([str(tsv)], "/data")
  assert len(src) == 12
  r = src[0]
  assert r["captions"] == ["A child holding a flowered umbrella and petting a yak."]
  assert r["image"] == "/data/coco/val2014/COCO_val2014_000000184613.jpg"
  assert r["neg_captions"] == ["A umbrella holding a flowered child and petting a yak .",
                               "A child petting a flowered umbrella and holding a yak ."]
  assert len(src[2]["neg_captions"]) == 3 and len(src[3]["neg_captions"]) == 1
  ids = [src[i]["image_id"] for i in range(12)]
  assert ids[0] == 0 and max(ids) == len(set(ids)) - 1
  assert src.has_negatives


def _write_pandas_like_tsv(path, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["", "title", "filepath", "neg_caption", "neg_image"])
    for i, (title, fp, negs) in enumerate(rows):
      w.writerow([i, title, fp, repr(negs), "[1, 2, 3]"])


def test_negclip_quoted_newlines_literal_lists_and_empty_negatives(tmp_path):
  p = tmp_path / "t.tsv"
  _write_pandas_like_tsv(p, [
      ("A dog\non a sofa. ", "coco/val2014/a.jpg", ["A sofa on a dog ."]),
      ('He said "hi"\tthere', "coco/val2014/a.jpg", []),
      ("a cat", "coco/train2014/b.jpg", ["it's a 'cat'", 'a "tac"']),
  ])
  src = sources.NegClipTsvSource([str(p)])
  assert len(src) == 3
  assert src[0]["captions"] == ["A dog\non a sofa. "]
  assert src[1]["captions"] == ['He said "hi"\tthere'] and src[1]["neg_captions"] == []
  assert src[2]["neg_captions"] == ["it's a 'cat'", 'a "tac"']
  assert [src[i]["image_id"] for i in range(3)] == [0, 0, 1]   # Same filepath, same image.


def test_negclip_bad_header_and_bad_literal_name_the_file(tmp_path):
  p = tmp_path / "h.tsv"
  p.write_text("a\tb\tc\n1\t2\t3\n")
  with pytest.raises(sources.DataFormatError, match="h.tsv.*header"):
    sources.NegClipTsvSource([str(p)])
  q = tmp_path / "l.tsv"
  q.write_text("\ttitle\tfilepath\tneg_caption\tneg_image\n0\tx\ty.jpg\t['unclosed\t[1]\n")
  with pytest.raises(sources.DataFormatError, match=r"l.tsv: row 0: neg_caption"):
    sources.NegClipTsvSource([str(q)])


def test_prepared_record_roundtrip():
  rec = sources.encode_prepared(b"\xff\xd8jpegbytes", ["a cap", "b"], 7, "x/y.jpg", ["neg"])
  out = sources.decode_prepared(rec)
  assert out == dict(image=b"\xff\xd8jpegbytes", captions=["a cap", "b"], image_id=7,
                     path="x/y.jpg", neg_captions=["neg"])
  with pytest.raises(sources.DataFormatError, match="prepare"):
    sources.decode_prepared(b"JUNKJUNK")


def test_tfds_without_tensorflow_datasets_says_what_to_install():
  import importlib.util
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    pytest.skip("tensorflow-datasets is installed")
  c = config_lib.base_config()
  c.data.source = "tfds"
  c.data.tfds.name = "coco_captions"
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    sources.make_source(c)


def test_unknown_source_is_a_clear_error():
  c = config_lib.base_config()
  c.data.source = "webdataset"
  with pytest.raises(ValueError, match="'webdataset' is not one of"):
    sources.make_source(c)


def test_string_table_roundtrip_unicode():
  words = ["", "héllo", "日本語", "a\nb", "x" * 1000]
  t = sources.StringTable(words)
  assert [t[i] for i in range(len(t))] == words
  assert isinstance(t._buf, np.ndarray)


def test_tfds_records_map_to_raw_records():
  # tfds.data_source gives dicts of numpy values (coco_captions: flat "image/id", nested
  # captions/text); the mapping is tested without TFDS installed.
  src = object.__new__(sources.TfdsSource)
  src.name, src.image_key, src.caption_key, src.id_key = ("coco_captions", "image",
                                                          "captions/text", "image/id")
  img = np.zeros((5, 6, 3), np.uint8)
  src._src = [{"image": img, "image/id": np.int64(391895),
               "captions": {"text": np.array([b"a cat", b"a dog"], dtype=object)}},
              {"image": img, "captions": {"text": b"only one"}}]
  r = src[0]
  assert r["captions"] == ["a cat", "a dog"] and r["image"].shape == (5, 6, 3)
  assert r["image_id"] == 391895 and r["path"] == "tfds:coco_captions[0]"
  assert src[1]["captions"] == ["only one"] and src[1]["image_id"] == 1   # No id: the index.
