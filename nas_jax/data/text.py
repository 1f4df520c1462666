"""Captions → fixed-length BERT token ids.

ALBEF's `pre_caption` cleaning followed by BERT uncased WordPiece with `[CLS] … [SEP]`, padded or
truncated to a fixed length so every batch has a static shape. The vocabulary is always local: a
`vocab.txt` file or a directory holding one (a HF model directory works). Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

# transformers prints a warning about PyTorch when imported without it; we only need the tokenizer.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_ALBEF_DELETE = re.compile(r"[,.'!?\"()*#:;~]")
_ALBEF_SPACE = re.compile(r"[-/]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
  """ALBEF's caption cleaning (dataset/utils.py `pre_caption`).

  Lower-case; delete , . ' ! ? " ( ) * # : ; ~; turn - and / into spaces; `<person>` → `person`;
  collapse whitespace; strip; keep the first `max_words` words.
  """
  caption = _ALBEF_DELETE.sub("", caption.lower())
  caption = _ALBEF_SPACE.sub(" ", caption)
  caption = caption.replace("<person>", "person")
  caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return caption


class VocabularyNotFoundError(FileNotFoundError):
  pass


def _resolve_vocab(path: str) -> str:
  if not path:
    raise VocabularyNotFoundError(
        "no BERT vocabulary given: pass a local vocab.txt or a model directory that holds one "
        "(e.g. the bert-base-uncased folder), or 'synthetic' for the built-in synthetic world")
  if os.path.isdir(path):
    candidate = os.path.join(path, "vocab.txt")
    if not os.path.isfile(candidate):
      raise VocabularyNotFoundError(
          f"{path} is a directory without vocab.txt: pass a bert-base-uncased model directory "
          "or the vocab.txt file itself")
    return candidate
  if not os.path.isfile(path):
    raise VocabularyNotFoundError(
        f"BERT vocabulary {path!r} does not exist: download bert-base-uncased's vocab.txt "
        "(30,522 WordPiece tokens) and pass its local path")
  return path


class Tokenizer:
  """BERT uncased WordPiece with fixed-length output.

  Args:
    vocab: path of a `vocab.txt` or of a directory containing one.
    lowercase: BERT uncased lower-cases and strips accents.
  """

  def __init__(self, vocab: str, lowercase: bool = True):
    from transformers import BertTokenizer

    self.vocab_file = _resolve_vocab(vocab)
    # transformers 5: `vocab=` (a path or a dict) is what reads a bare vocab.txt; `vocab_file=`
    # silently yields a 5-token vocabulary that maps every word to [UNK].
    self._tok = BertTokenizer(vocab=self.vocab_file, do_lower_case=lowercase)
    self.pad_id = self._tok.pad_token_id
    self.cls_id = self._tok.cls_token_id
    self.sep_id = self._tok.sep_token_id
    self.mask_id = self._tok.mask_token_id
    self.unk_id = self._tok.unk_token_id
    self.vocab_size = len(self._tok.vocab)

  def __call__(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises already-cleaned texts.

    Returns:
      ids: int32 [B, max_len], `[CLS] tokens [SEP] [PAD]…`, truncated to max_len (the [SEP] kept).
      mask: int32 [B, max_len], 1 on real tokens (including [CLS] and [SEP]).
    """
    out = self._tok(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_attention_mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    mask = np.asarray(out["attention_mask"], dtype=np.int32)
    return ids, mask

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if i != self.pad_id], skip_special_tokens=True)

  def __reduce__(self):  # Picklable for grain worker processes.
    return (Tokenizer, (self.vocab_file,))


# bert-base-uncased's special ids; its first ordinary word piece is 1000 ('!' after [unused*]).
BERT_UNCASED_IDS = {"pad": 0, "cls": 101, "sep": 102, "mask": 103, "first": 1000}


def special_ids(vocab: str) -> dict[str, int]:
  """{'pad', 'cls', 'sep', 'mask', 'first' (the first ordinary id)} of a vocabulary: read from it
  when it is 'synthetic' or a path; bert-base-uncased's when unset ('', the stage configs')."""
  if not vocab:
    return dict(BERT_UNCASED_IDS)
  tok = load_tokenizer(vocab)
  out = {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id}
  out["first"] = max(out.values()) + 1 if vocab == "synthetic" else BERT_UNCASED_IDS["first"]
  return out


def load_tokenizer(vocab: str) -> Tokenizer:
  """`vocab` is a path, or 'synthetic' for the synthetic world's own small vocabulary."""
  if vocab == "synthetic":
    from nas_jax.data import synthetic
    return Tokenizer(synthetic.vocab_file())
  return Tokenizer(vocab)
