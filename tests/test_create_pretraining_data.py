"""create_pretraining_data: Google's instances, in Google's order; sharding, parallelism, atomic output, errors.

The oracle is bert-tensorflow 1.0.4's `create_pretraining_data.main`, run for every configuration in ONE subprocess
per module (TensorFlow 1 flags and globals must not leak into this process); its TFRecords are read back with
`records.PretrainingData` and compared feature by feature, instance by instance, with ours. bert-tensorflow 1.0.4
predates `--do_whole_word_mask`, so whole-word masking (and `--masking=none`) is compared with a line-by-line
transcription of the published google-research/bert script (`google_transcription` below).
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clinical_bert_jax import records
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records import FEATURE_NAMES, PretrainingData, read_manifest
from clinical_bert_jax.tokenization import FullTokenizer
from data_prep import create_pretraining_data as cpd
from data_prep.create_pretraining_data import InstanceOptions, create_pretraining_data, plan_shards
from tests.cli_util import REPO, assert_one_line_error, run_module
from tests.test_tokenization import ACI_BENCH_CSV, SAMPLE_TEXT, uncased_vocab_file, write_cased_vocab

pytestmark = pytest.mark.slow  # Google's TF generator as oracle, CLI runs

DEMO_NOTES = 40  # ACI-BENCH notes in the demo slice: enough documents for negatives, small for the oracle

EDGE_TEXT = (
  "\ufeffThe first line of document one starts with a byte order mark.\n"
  "Its second line\rhas a carriage return inside, which tf.gfile drops.\r\n"
  "   \t \n"  # whitespace only: a document break
  "\x07\x00\n"  # not blank, but no tokens: neither a sentence nor a break
  + "A very long sentence that must be truncated from both ends. "
  * 12
  + "\n"
  "\n\n\n"
  "中文 text with [**2101-10-20**] placeholders and a literal [MASK] token.\n"
  "Short.\nAnother short one.\nAnd a third, so chunks have several segments.\n"
  "\u2028\n"  # a line separator alone is blank for str.strip()
  "A single-segment document.\n"
  "\n"
  "Pt c/o SOB x3d, BP 120/80, HR 72; denies CP.\nFollow-up in 2 wks.\n"
)


def write_demo_text(path: Path, num_notes: int | None = None) -> Path:
  """ACI-BENCH notes in Google's format: each non-empty note line a line, a blank line between notes."""
  with open(ACI_BENCH_CSV, newline="", encoding="utf-8") as handle:
    notes = [row["TEXT"] for row in csv.DictReader(handle)][:num_notes]
  documents = ["\n".join(line.strip() for line in note.split("\n") if line.strip()) for note in notes]
  path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
  return path


# name: (input, vocabulary, Google's flags beyond input/output/vocab, our output format)
CONFIGS = {
  "sample_uncased_128": ("sample", "uncased", {"max_seq_length": 128, "dupe_factor": 2}, "tfrecord"),
  "sample_cased_64": ("sample", "cased", {"max_seq_length": 64, "dupe_factor": 2}, "native"),
  "demo_cased_128": ("demo", "cased", {"max_seq_length": 128, "dupe_factor": 2}, "native"),
  "demo_uncased_64": (
    "demo",
    "uncased",
    {
      "max_seq_length": 64,
      "dupe_factor": 2,
      "masked_lm_prob": 0.2,
      "max_predictions_per_seq": 6,
      "short_seq_prob": 0.5,
      "random_seed": 7,
    },
    "tfrecord",
  ),
  "edge_cased_16": (
    "edge",
    "cased",
    {"max_seq_length": 16, "max_predictions_per_seq": 5, "dupe_factor": 3, "short_seq_prob": 0.3},
    "native",
  ),
  "one_document_24": ("one_document", "uncased", {"max_seq_length": 24, "dupe_factor": 2}, "native"),
}

GOOGLE_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow.compat.v1 as tf
    sys.modules["tensorflow"] = tf
    from bert import create_pretraining_data as google
    tf.logging.info = lambda *args, **kwargs: None  # Google logs 20 instances as text: keep note text out of logs
    for run in json.load(open(sys.argv[1])):
      google.FLAGS.unparse_flags()  # back to Google's defaults before each run
      google.FLAGS(["oracle"])
      for name, value in run.items():
        setattr(google.FLAGS, name, value)
      google.main(None)
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
  directory = tmp_path_factory.mktemp("inputs")
  edge = directory / "edge.txt"
  edge.write_bytes(EDGE_TEXT.encode("utf-8"))
  one_document = directory / "one_document.txt"
  one_document.write_text("\n".join(SAMPLE_TEXT.read_text(encoding="utf-8").split("\n")[3:15]) + "\n", encoding="utf-8")
  return {
    "sample": SAMPLE_TEXT,
    "demo": write_demo_text(directory / "demo.txt", DEMO_NOTES),
    "edge": edge,
    "one_document": one_document,
  }


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
  return {
    "uncased": (uncased_vocab_file(), True),
    "cased": (write_cased_vocab(tmp_path_factory.mktemp("vocab")), False),
  }


@pytest.fixture(scope="module")
def google(inputs, vocabs, tmp_path_factory) -> dict[str, Path]:
  """Google's TFRecord per configuration, all written by one oracle subprocess."""
  directory = tmp_path_factory.mktemp("google")
  runs, outputs = [], {}
  for name, (input_name, vocab_name, flags, _) in CONFIGS.items():
    vocab_file, do_lower_case = vocabs[vocab_name]
    outputs[name] = directory / f"{name}.tfrecord"
    runs.append(
      {
        "input_file": str(inputs[input_name]),
        "output_file": str(outputs[name]),
        "vocab_file": str(vocab_file),
        "do_lower_case": do_lower_case,
        **flags,
      }
    )
  (directory / "runs.json").write_text(json.dumps(runs))
  result = subprocess.run(
    [sys.executable, "-c", GOOGLE_SCRIPT, str(directory / "runs.json")],
    capture_output=True,
    text=True,
    timeout=900,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return outputs


def read_all(path: Path) -> dict[str, np.ndarray]:
  data = PretrainingData.open(str(path))
  return data.get_batch(np.arange(len(data)))


def assert_same_instances(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert len(ours["input_ids"]) == len(expected["input_ids"]) > 0
  for name in FEATURE_NAMES:
    different = np.flatnonzero(~(ours[name] == expected[name]).reshape(len(ours[name]), -1).all(axis=1))
    assert different.size == 0, f"{name} differs in {different.size} instances, first at index {different[0]}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_google_instance_for_instance(name, inputs, vocabs, google, tmp_path):
  input_name, vocab_name, flags, output_format = CONFIGS[name]
  vocab_file, do_lower_case = vocabs[vocab_name]
  manifest = create_pretraining_data(
    str(inputs[input_name]),
    vocab_file,
    tmp_path / "out",
    do_lower_case=do_lower_case,
    options=InstanceOptions(**flags),
    output_format=output_format,
  )
  ours = read_all(tmp_path / "out")
  assert_same_instances(ours, read_all(google[name]))
  assert manifest["format"] == {"native": "cbj", "tfrecord": "tfrecord"}[output_format]
  assert (manifest["max_seq_length"], manifest["masking"], manifest["do_lower_case"]) == (
    flags["max_seq_length"],
    "static",
    do_lower_case,
  )
  assert read_manifest(tmp_path / "out")["totals"]["count"] == len(ours["input_ids"])
  # Python 3 round() (half to even) on the float product sets the number of predictions of every instance.
  lengths = ours["input_mask"].sum(axis=1)
  expected_predictions = [
    min(flags.get("max_predictions_per_seq", 20), max(1, round(int(length) * flags.get("masked_lm_prob", 0.15))))
    for length in lengths
  ]
  assert ours["masked_lm_weights"].sum(axis=1).astype(int).tolist() == expected_predictions


# ----------------------------------------------------------------------------------------------------------------
# Whole-word masking and --masking=none against a transcription of the published script
# ----------------------------------------------------------------------------------------------------------------


def google_transcription(
  path: Path,
  tokenizer: FullTokenizer,
  max_seq_length: int,
  dupe_factor: int,
  short_seq_prob: float,
  masked_lm_prob: float,
  max_predictions_per_seq: int,
  seed: int,
  do_whole_word_mask: bool,
  mask: bool,
) -> list[tuple]:
  """google-research/bert create_pretraining_data.py (with do_whole_word_mask), transcribed line by line on token
  strings; `mask=False` skips create_masked_lm_predictions. Returns (tokens, segment_ids, is_random_next,
  positions, labels) per instance in output order."""
  rng = random.Random(seed)
  all_documents = [[]]
  with open(path, "rb") as handle:
    for raw in handle.read().replace(b"\r", b"").decode("utf-8").split("\n"):
      line = raw.strip()
      if not line:
        all_documents.append([])
      tokens = tokenizer.tokenize(line)
      if tokens:
        all_documents[-1].append(tokens)
  all_documents = [x for x in all_documents if x]
  rng.shuffle(all_documents)
  vocab_words = list(tokenizer.vocab.keys())
  instances = []
  for _ in range(dupe_factor):
    for document_index in range(len(all_documents)):
      document = all_documents[document_index]
      max_num_tokens = max_seq_length - 3
      target_seq_length = max_num_tokens
      if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
      current_chunk, current_length, i = [], 0, 0
      while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
          if current_chunk:
            a_end = 1
            if len(current_chunk) >= 2:
              a_end = rng.randint(1, len(current_chunk) - 1)
            tokens_a = [token for segment in current_chunk[:a_end] for token in segment]
            tokens_b = []
            if len(current_chunk) == 1 or rng.random() < 0.5:
              is_random_next = True
              target_b_length = target_seq_length - len(tokens_a)
              for _ in range(10):
                random_document_index = rng.randint(0, len(all_documents) - 1)
                if random_document_index != document_index:
                  break
              random_document = all_documents[random_document_index]
              random_start = rng.randint(0, len(random_document) - 1)
              for j in range(random_start, len(random_document)):
                tokens_b.extend(random_document[j])
                if len(tokens_b) >= target_b_length:
                  break
              i -= len(current_chunk) - a_end
            else:
              is_random_next = False
              for j in range(a_end, len(current_chunk)):
                tokens_b.extend(current_chunk[j])
            while len(tokens_a) + len(tokens_b) > max_num_tokens:
              trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
              if rng.random() < 0.5:
                del trunc_tokens[0]
              else:
                trunc_tokens.pop()
            tokens = ["[CLS]"] + tokens_a + ["[SEP]"] + tokens_b + ["[SEP]"]
            segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            positions, labels = [], []
            if mask:
              cand_indexes = []
              for index, token in enumerate(tokens):
                if token == "[CLS]" or token == "[SEP]":
                  continue
                if do_whole_word_mask and len(cand_indexes) >= 1 and token.startswith("##"):
                  cand_indexes[-1].append(index)
                else:
                  cand_indexes.append([index])
              rng.shuffle(cand_indexes)
              output_tokens = list(tokens)
              num_to_predict = min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob))))
              masked_lms = []
              covered_indexes = set()
              for index_set in cand_indexes:
                if len(masked_lms) >= num_to_predict:
                  break
                if len(masked_lms) + len(index_set) > num_to_predict:
                  continue
                if any(index in covered_indexes for index in index_set):
                  continue
                for index in index_set:
                  covered_indexes.add(index)
                  if rng.random() < 0.8:
                    masked_token = "[MASK]"
                  elif rng.random() < 0.5:
                    masked_token = tokens[index]
                  else:
                    masked_token = vocab_words[rng.randint(0, len(vocab_words) - 1)]
                  output_tokens[index] = masked_token
                  masked_lms.append((index, tokens[index]))
              masked_lms.sort()
              tokens = output_tokens
              positions, labels = [p for p, _ in masked_lms], [label for _, label in masked_lms]
            instances.append((tokens, segment_ids, is_random_next, positions, labels))
          current_chunk, current_length = [], 0
        i += 1
  rng.shuffle(instances)
  return instances


def transcription_features(
  instances: list[tuple], tokenizer: FullTokenizer, max_seq_length: int, max_predictions: int
) -> dict[str, np.ndarray]:
  features = collections.defaultdict(list)
  for tokens, segment_ids, is_random_next, positions, labels in instances:
    padding = [0] * (max_seq_length - len(tokens))
    features["input_ids"].append(tokenizer.convert_tokens_to_ids(tokens) + padding)
    features["input_mask"].append([1] * len(tokens) + padding)
    features["segment_ids"].append(segment_ids + padding)
    slot_padding = [0] * (max_predictions - len(positions))
    features["masked_lm_positions"].append(positions + slot_padding)
    features["masked_lm_ids"].append(tokenizer.convert_tokens_to_ids(labels) + slot_padding)
    features["masked_lm_weights"].append([1.0] * len(positions) + slot_padding)
    features["next_sentence_labels"].append(int(is_random_next))
  return {name: np.asarray(values) for name, values in features.items()}


@pytest.mark.parametrize(
  "vocab_name, max_seq_length, masking", [("cased", 64, "static"), ("uncased", 128, "static"), ("cased", 128, "none")]
)
def test_whole_word_masking_and_no_masking_match_published_algorithm(
  vocab_name, max_seq_length, masking, inputs, vocabs, tmp_path
):
  vocab_file, do_lower_case = vocabs[vocab_name]
  options = InstanceOptions(
    max_seq_length=max_seq_length,
    dupe_factor=2,
    do_whole_word_mask=masking == "static",
    masking=masking,
    random_seed=11,
  )
  manifest = create_pretraining_data(
    str(inputs["demo"]), vocab_file, tmp_path / "out", do_lower_case=do_lower_case, options=options
  )
  tokenizer = FullTokenizer(vocab_file, do_lower_case)
  expected = google_transcription(
    inputs["demo"],
    tokenizer,
    max_seq_length,
    2,
    0.1,
    0.15,
    20,
    11,
    do_whole_word_mask=masking == "static",
    mask=masking == "static",
  )
  stored_predictions = 20 if masking == "static" else 0
  assert manifest["max_predictions_per_seq"] == stored_predictions
  ours = read_all(tmp_path / "out")
  assert_same_instances(ours, transcription_features(expected, tokenizer, max_seq_length, stored_predictions))
  if masking == "static":  # whole words really were masked together somewhere
    continuation = np.array([token.startswith("##") for token in tokenizer.inv_vocab.values()])
    masked_continuations = continuation[ours["masked_lm_ids"]] & (ours["masked_lm_weights"] > 0)
    assert masked_continuations.sum() > 100


# ----------------------------------------------------------------------------------------------------------------
# Sharding and workers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_input(tmp_path_factory) -> Path:
  return write_demo_text(tmp_path_factory.mktemp("large") / "demo_all.txt")


def test_shards_are_separate_google_runs_and_workers_do_not_change_output(large_input, vocabs, tmp_path):
  vocab_file, do_lower_case = vocabs["cased"]
  options = InstanceOptions(dupe_factor=1, max_seq_length=64)
  ranges, forced_cuts = plan_shards(large_input, 200_000)
  assert len(ranges) == 3 and forced_cuts == 0
  data = large_input.read_bytes()
  assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
  for (_, end), (start, _) in zip(ranges, ranges[1:]):
    assert end == start and data[:end].endswith(b"\n\n")  # cut right after a blank line
  one = create_pretraining_data(
    str(large_input),
    vocab_file,
    tmp_path / "one",
    do_lower_case=do_lower_case,
    options=options,
    max_shard_bytes=200_000,
  )
  two = create_pretraining_data(
    str(large_input),
    vocab_file,
    tmp_path / "two",
    do_lower_case=do_lower_case,
    options=options,
    max_shard_bytes=200_000,
    num_workers=2,
  )
  assert [shard["checksum"] for shard in one["shards"]] == [shard["checksum"] for shard in two["shards"]]
  assert sum(shard["documents"] for shard in one["shards"]) == 207  # documents are never split
  # Shard k is a Google run on its own bytes with seed + k.
  for index, (start, end) in enumerate(ranges):
    alone = tmp_path / f"shard{index}.txt"
    alone.write_bytes(data[start:end])
    create_pretraining_data(
      str(alone),
      vocab_file,
      tmp_path / f"alone{index}",
      do_lower_case=do_lower_case,
      options=InstanceOptions(dupe_factor=1, max_seq_length=64, random_seed=12345 + index),
    )
    shard_file = tmp_path / "one" / one["shards"][index]["name"]
    assert_same_instances(read_all(shard_file), read_all(tmp_path / f"alone{index}"))


class _RowByRowWriter:
  """Hands every row of a block to `write` on its own: the generator's path before `write_batch`."""

  def __init__(self, writer):
    self.writer = writer

  def write_batch(self, batch: dict[str, np.ndarray]) -> None:
    for row in range(len(batch["input_ids"])):
      self.writer.write({name: values[row] for name, values in batch.items()})


@pytest.mark.parametrize("file_format", [records.FORMAT_NATIVE, records.FORMAT_TFRECORD])
@pytest.mark.parametrize("masking", ["static", "none"])
def test_block_writes_are_byte_identical_to_instance_writes(
  file_format, masking, inputs, vocabs, tmp_path, monkeypatch
):
  monkeypatch.setattr(cpd, "_WRITE_BLOCK", 150)  # several blocks, the last one partial
  vocab_file, do_lower_case = vocabs["uncased"]
  options = InstanceOptions(dupe_factor=2, max_seq_length=64, masking=masking)
  tokenizer = FullTokenizer(str(vocab_file), do_lower_case)
  vocab = cpd.VocabIds.from_tokenizer(tokenizer)
  size = inputs["demo"].stat().st_size
  corpus = cpd.read_corpus(cpd.ShardTask(str(inputs["demo"]), 0, size, 12345, "unused"), tokenizer, vocab)
  store, order = cpd.generate_instances(corpus, options, vocab, 12345)
  assert len(order) > 3 * 150 and len(order) % 150
  infos = {}
  for path, wrap in [(tmp_path / "blocks.bin", lambda writer: writer), (tmp_path / "rows.bin", _RowByRowWriter)]:
    with records.open_writer(
      file_format, path, options.max_seq_length, options.stored_predictions, records.vocab_fingerprint(vocab_file)[1]
    ) as writer:
      cpd.write_instances(store, order, wrap(writer), options.max_seq_length, options.stored_predictions)
    infos[path.name] = writer.info
  assert (tmp_path / "blocks.bin").read_bytes() == (tmp_path / "rows.bin").read_bytes()
  assert infos["blocks.bin"].checksum == infos["rows.bin"].checksum and infos["rows.bin"].count == len(order)


def test_document_longer_than_a_shard_is_cut_at_a_line(tmp_path, vocabs):
  path = tmp_path / "long.txt"
  path.write_text("".join(f"Sentence number {i} of one long document.\n" for i in range(400)) + "\nTail doc.\n")
  ranges, forced_cuts = plan_shards(path, 4000)
  assert forced_cuts >= 1 and all(end - start <= 8100 for start, end in ranges)
  data = path.read_bytes()
  assert all(data[end - 1 : end] == b"\n" for _, end in ranges)  # every cut at a line start
  manifest = create_pretraining_data(
    str(path),
    vocabs["uncased"][0],
    tmp_path / "out",
    do_lower_case=True,
    options=InstanceOptions(dupe_factor=1),
    max_shard_bytes=4000,
  )
  assert manifest["forced_cuts"] == forced_cuts and len(manifest["shards"]) == len(ranges)


# ----------------------------------------------------------------------------------------------------------------
# Errors and atomic output
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "options, fragment",
  [
    (InstanceOptions(max_seq_length=4), "--max_seq_length=4"),
    (InstanceOptions(max_predictions_per_seq=200), "--max_predictions_per_seq=200"),
    (InstanceOptions(masked_lm_prob=1.5), "--masked_lm_prob=1.5"),
    (InstanceOptions(dupe_factor=0), "--dupe_factor=0"),
    (InstanceOptions(masking="dynamic"), "--masking=dynamic"),
  ],
)
def test_bad_options_are_user_errors(options, fragment, inputs, vocabs, tmp_path):
  with pytest.raises(UserError, match=fragment):
    create_pretraining_data(str(inputs["edge"]), vocabs["cased"][0], tmp_path / "out", options=options)
  assert not (tmp_path / "out").exists()


def test_bad_inputs_are_user_errors_and_leave_no_output(inputs, vocabs, tmp_path):
  vocab_file = vocabs["cased"][0]
  with pytest.raises(UserError, match="matches no files"):
    create_pretraining_data(str(tmp_path / "missing*.txt"), vocab_file, tmp_path / "out")
  no_specials = tmp_path / "vocab.txt"
  no_specials.write_text("[PAD]\n[UNK]\nword\n")
  with pytest.raises(UserError, match="lacks the special tokens"):
    create_pretraining_data(str(inputs["edge"]), no_specials, tmp_path / "out")
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\n\nanother\nbroken \xff\xfe byte\n")
  with pytest.raises(UserError, match=r"bad.txt line 4 is not valid UTF-8"):
    create_pretraining_data(f"{inputs['edge']},{bad}", vocab_file, tmp_path / "out", num_workers=2)
  assert not (tmp_path / "out").exists()
  assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.txt", "vocab.txt"]  # no staging left behind
  create_pretraining_data(str(inputs["edge"]), vocab_file, tmp_path / "out", options=InstanceOptions(dupe_factor=1))
  with pytest.raises(UserError, match="not empty"):
    create_pretraining_data(str(inputs["edge"]), vocab_file, tmp_path / "out")
  manifest = create_pretraining_data(
    str(inputs["edge"]), vocab_file, tmp_path / "out", overwrite=True, options=InstanceOptions(dupe_factor=2)
  )
  assert read_manifest(tmp_path / "out")["dupe_factor"] == manifest["dupe_factor"] == 2


def test_killed_run_leaves_nothing_complete_and_rerun_finishes(large_input, vocabs, tmp_path):
  output = tmp_path / "out"
  command = [
    sys.executable,
    "-m",
    "data_prep.create_pretraining_data",
    f"--input={large_input}",
    f"--vocab_file={vocabs['cased'][0]}",
    f"--output_dir={output}",
    "--dupe_factor=10",
  ]
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
  try:
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.01)
  finally:
    process.kill()  # SIGKILL while the staging directory is being filled
    process.wait()
  assert process.returncode == -signal.SIGKILL and list(tmp_path.glob(".out.tmp-*"))
  assert not output.exists()
  create_pretraining_data(str(large_input), vocabs["cased"][0], output, options=InstanceOptions(dupe_factor=1))
  assert len(PretrainingData.open(str(output))) == read_manifest(output)["total_instances"] > 0


def test_cli_logs_counts_never_text(inputs, vocabs, tmp_path):
  result = run_module(
    "data_prep.create_pretraining_data",
    f"--input={inputs['edge']}",
    f"--vocab_file={vocabs['cased'][0]}",
    f"--output_dir={tmp_path / 'out'}",
    "--dupe_factor=1",
    "--output_format=tfrecord",
    "--max_seq_length=32",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "instances" in result.stderr
  for word in ("carriage", "placeholders", "truncated", "SOB", "Follow"):
    assert word not in result.stderr + result.stdout
  manifest = read_manifest(tmp_path / "out")
  assert manifest["flags"]["max_seq_length"] == 32 and manifest["format"] == "tfrecord"
  failed = run_module(
    "data_prep.create_pretraining_data",
    f"--input={tmp_path / 'nothing*.txt'}",
    f"--vocab_file={vocabs['cased'][0]}",
    f"--output_dir={tmp_path / 'out2'}",
  )
  assert_one_line_error(failed, "matches no files")


def test_inlined_random_draws_equal_python_random():
  cpd.check_python_random()
  generator, reference = random.Random(3), random.Random(3)
  items = list(range(1000))
  expected = list(items)
  cpd._shuffle(items, generator.getrandbits)
  reference.shuffle(expected)
  assert items == expected and generator.random() == reference.random()
