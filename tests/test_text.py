"""Tokenizer ids against transformers' BertTokenizer (as loaded for the real minilm model) and the
independent Rust WordPiece of its tokenizer.json; ALBEF's caption cleaning; clear errors."""

import numpy as np
import pytest

from nas_jax.data.text import Tokenizer, VocabularyNotFoundError, load_tokenizer, pre_caption

MAX_LEN = 16

CAPTIONS = [
    "A man riding a horse on the beach.",
    "Two DOGS, one cat; and a bird!!!",
    "The cup is to the LEFT of the plate (not the right).",
    "Crème brûlée and a naïve café in São Paulo",
    "Ångström-level détails: ÉCOLE über Straße",
    "don't stop-believing: 3.5 kg/m² of \"snow\" & ice ~ #1?",
    "a very long caption " + " ".join(f"word{i} and more" for i in range(40)),
    "tabs\tand\nnew lines   and    spaces",
    "emoji 🐶 and 日本語 characters",
    "",
]


@pytest.fixture(scope="module")
def ours(minilm_dir):
  return Tokenizer(str(minilm_dir))


def _hf_reference(minilm_dir, texts, max_len):
  from transformers import BertTokenizer
  ref = BertTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
  out = ref(list(texts), padding="max_length", truncation=True, max_length=max_len)
  return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


def _rust_reference(minilm_dir, texts, max_len):
  from tokenizers import Tokenizer as RustTokenizer
  tok = RustTokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
  encs = tok.encode_batch(list(texts))
  return np.array([e.ids for e in encs]), np.array([e.attention_mask for e in encs])


@pytest.mark.parametrize("clean", [False, True], ids=["raw", "pre_caption"])
def test_ids_match_transformers_and_rust_wordpiece(ours, minilm_dir, clean):
  texts = [pre_caption(c, 30) if clean else c for c in CAPTIONS]
  ids, mask = ours(texts, MAX_LEN)
  assert ids.shape == mask.shape == (len(texts), MAX_LEN)
  assert ids.dtype == mask.dtype == np.int32
  for name, (ref_ids, ref_mask) in {
      "transformers.BertTokenizer": _hf_reference(minilm_dir, texts, MAX_LEN),
      "tokenizers (tokenizer.json)": _rust_reference(minilm_dir, texts, MAX_LEN)}.items():
    np.testing.assert_array_equal(ids, ref_ids, err_msg=name)
    np.testing.assert_array_equal(mask, ref_mask, err_msg=name)


def test_layout_of_ids(ours):
  ids, mask = ours(CAPTIONS, MAX_LEN)
  assert (ids[:, 0] == ours.cls_id).all()
  lengths = mask.sum(1)
  for row, n in zip(ids, lengths):
    assert row[n - 1] == ours.sep_id          # [SEP] kept, also when truncated.
    assert (row[n:] == ours.pad_id).all()     # Right padding.
  assert lengths[6] == MAX_LEN                 # The long caption is truncated.
  assert lengths[-1] == 2                     # "" -> [CLS] [SEP].
  # Accents are stripped and text lower-cased (BERT uncased): these pairs tokenize identically.
  a, _ = ours(["Crème Brûlée CAFÉ", "creme brulee cafe"], MAX_LEN)
  np.testing.assert_array_equal(a[0], a[1])
  assert ours.unk_id in ours(["emoji 🐶"], MAX_LEN)[0]


def test_pre_caption_hand_checked():
  assert pre_caption("A man's HAT, (red)!") == "a mans hat red"
  assert pre_caption("left-hand/right-hand   side\n") == "left hand right hand side"
  assert pre_caption("<person> holds a cup") == "person holds a cup"
  assert pre_caption(" ".join(["w"] * 40), max_words=30) == " ".join(["w"] * 30)


def test_missing_vocabulary_is_a_clear_error(tmp_path):
  with pytest.raises(VocabularyNotFoundError, match="no BERT vocabulary given"):
    Tokenizer("")
  with pytest.raises(VocabularyNotFoundError, match="does not exist: download bert-base-uncased"):
    load_tokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(VocabularyNotFoundError, match="directory without vocab.txt"):
    Tokenizer(str(tmp_path))
