"""BIO CoNLL files: moved to `clinical_bert_jax.bio_format` (the NER evaluator reads them, and `clinical_bert_jax`
never imports `data_prep`); this name stays for the converters and existing imports."""

from clinical_bert_jax.bio_format import (
  SPLITS,
  Sentence,
  bio_label_list,
  describe_label,
  I2B2_ENTITY_TYPES,
  label_counts,
  load_bio_dir,
  read_bio,
  read_label_list,
  split_counts,
  validate_labels,
  write_bio,
  write_label_list,
)
