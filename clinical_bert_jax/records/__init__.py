"""Storage of BERT pretraining instances: native memory-mapped shards, TFRecord files, manifests and readers.

An *instance* is what Google's `create_pretraining_data.py` writes for one sequence pair: a dict of numpy arrays
with exactly its TFRecord feature names (bert-pretraining.md §3):

  input_ids, input_mask, segment_ids      int32 [max_seq_length], 0-padded
  masked_lm_positions, masked_lm_ids      int32 [max_predictions_per_seq], 0-padded
  masked_lm_weights                       float32 [max_predictions_per_seq], 1.0 real / 0.0 padding
  next_sentence_labels                    int32 [] (0 = B really follows A, 1 = B is random)

Two on-disk formats hold them:

* the native shard (`*.cbj`): fixed-size little-endian records after a 64-byte header and before a 24-byte footer,
  so a reader `np.memmap`s the file and fancy-indexes any batch of records without parsing. Only what cannot be
  derived is stored (ids, number of real tokens, start of segment B, predictions, label); the footer holds the
  record count, a CRC-32 of the payload and the largest id, so a shard from a killed run (no footer) is rejected and
  ids can be checked against the vocabulary without a scan. The exact layout is in docs/data-formats.md.
* TFRecord (`*.tfrecord`): `tf.train.Example` protos with Google's feature names and types, framed with masked
  CRC-32C, readable by TensorFlow and by Google's `run_pretraining.py`. Encoded and decoded here in numpy, without
  importing TensorFlow (which is optional for users and slow to import).

Writers take single instances (`write`, buffered into vectorised chunks) or whole [n, ...] batches (`write_batch`,
the generator's path: no per-instance copies); either way gives the same bytes. They stream to a temporary name
and rename on `close()`, so a partial shard never exists under its final name.
`PretrainingData` opens any mix of both formats as one random-access dataset for the training input pipeline.

Modules, one concern each (docs/ARCHITECTURE.md):

  schema    feature names, dtypes and shapes, format names and suffixes, `ShardInfo`, `manifest.json`
  base      instance checks, the streaming writer and shard reader base classes both formats share
  native    the `.cbj` record layout, its writer and its memory-mapped reader
  crc32c    CRC-32C of TFRecord framing, vectorised over many messages
  wire      the `tf.train.Example` protobuf wire codec and the vectorised decoder of the fixed layout
  tfrecord  TFRecord framing, writer and reader
  dataset   `open_writer` for either format, globbing, `PretrainingData` over any mix of shards

Everything public is re-exported here, so `records.NAME` works as it did when this was one module. To monkeypatch a
helper, patch the submodule that calls it (e.g. `records.tfrecord._canonical_feature_spans`).
"""

from clinical_bert_jax.records.crc32c import crc32c_many, masked_crc32c
from clinical_bert_jax.records.dataset import PretrainingData, open_writer
from clinical_bert_jax.records.native import (
  NATIVE_FOOTER_MAGIC,
  NATIVE_FOOTER_SIZE,
  NATIVE_HEADER_SIZE,
  NATIVE_MAGIC,
  NATIVE_VERSION,
  NativeShardWriter,
  native_record_dtype,
)
from clinical_bert_jax.records.schema import (
  FEATURE_DTYPES,
  FEATURE_NAMES,
  FORMAT_NATIVE,
  FORMAT_TFRECORD,
  MANIFEST_NAME,
  NATIVE_SUFFIX,
  PREDICTION_FEATURES,
  SEQUENCE_FEATURES,
  TFRECORD_SUFFIX,
  TOOL_VERSION,
  ShardInfo,
  check_shard_names,
  read_manifest,
  shard_file_name,
  write_manifest,
)
from clinical_bert_jax.records.tfrecord import TFRecordWriter
from clinical_bert_jax.records.wire import decode_example, encode_examples, example_feature_payloads
from clinical_bert_jax.vocab import vocab_fingerprint  # records.vocab_fingerprint: its old home

__all__ = [
  "FEATURE_DTYPES",
  "FEATURE_NAMES",
  "FORMAT_NATIVE",
  "FORMAT_TFRECORD",
  "MANIFEST_NAME",
  "NATIVE_FOOTER_MAGIC",
  "NATIVE_FOOTER_SIZE",
  "NATIVE_HEADER_SIZE",
  "NATIVE_MAGIC",
  "NATIVE_SUFFIX",
  "NATIVE_VERSION",
  "PREDICTION_FEATURES",
  "SEQUENCE_FEATURES",
  "TFRECORD_SUFFIX",
  "TOOL_VERSION",
  "NativeShardWriter",
  "PretrainingData",
  "ShardInfo",
  "TFRecordWriter",
  "check_shard_names",
  "crc32c_many",
  "decode_example",
  "encode_examples",
  "example_feature_payloads",
  "masked_crc32c",
  "native_record_dtype",
  "open_writer",
  "read_manifest",
  "shard_file_name",
  "vocab_fingerprint",
  "write_manifest",
]
