"""Input: tokenizer, synthetic world, ALBEF-format corpora, transforms, grain pipelines."""
