"""The paper flagfiles resolve to the paper's settings (Alsentzer et al. 2019, §3 and the released code).

Each of the four files includes experiments/paper_base.cfg (absl nested flagfiles) and says only what differs; the
numbers below are the paper's, written out here independently of the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess per flagfile

REPO = Path(__file__).resolve().parents[1]
PAPER = {
  "train_batch_size": 32,
  "max_seq_length": 128,
  "max_predictions_per_seq": 20,
  "num_warmup_steps": 10_000,
  "learning_rate": 5e-5,
  "optimizer": "google_adamw",
  "masking": "static",
  "seed": 12345,
}
MODELS = {  # flagfile: (steps, init checkpoint, data)
  "clinical": (150_000, "tf:/models/cased_L-12_H-768_A-12/bert_model.ckpt", "all_notes"),
  "discharge": (100_000, "tf:/models/cased_L-12_H-768_A-12/bert_model.ckpt", "discharge_summary"),
  "bio_clinical": (150_000, "tf:/models/biobert_v1.0_pubmed_pmc/biobert_model.ckpt", "all_notes"),
  "bio_discharge": (100_000, "tf:/models/biobert_v1.0_pubmed_pmc/biobert_model.ckpt", "discharge_summary"),
}
_RESOLVE = """
import json, sys
from absl import flags
from clinical_bert_jax import pretrain
pretrain.define_flags()
flags.FLAGS(["pretrain", "--flagfile=" + sys.argv[1]])
print(json.dumps({flag.name: flag.value for flag in flags.FLAGS.get_flags_for_module(pretrain.__name__)}))
"""


def _resolve(flagfile: str) -> dict:
  finished = subprocess.run(
    [sys.executable, "-c", _RESOLVE, flagfile], cwd=REPO, capture_output=True, text=True, check=True
  )
  return json.loads(finished.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_paper_flagfile_resolves_to_the_papers_settings(name):
  values = _resolve(f"experiments/{name}.cfg")
  steps, init, data = MODELS[name]
  assert {key: values[key] for key in PAPER} == PAPER
  assert values["num_train_steps"] == steps
  assert values["init_checkpoint"] == init
  assert values["input_file"] == f"/data/mimic/{data}/*.cbj"
  assert values["vocab_file"].endswith("cased_L-12_H-768_A-12/vocab.txt")


def test_paper_flagfiles_say_only_what_differs():
  shared = {
    line for line in (REPO / "experiments" / "paper_base.cfg").read_text().splitlines() if line.startswith("--")
  }
  for name in MODELS:
    own = [line for line in (REPO / "experiments" / f"{name}.cfg").read_text().splitlines() if line.startswith("--")]
    assert "--flagfile=experiments/paper_base.cfg" in own
    assert not shared & set(own), f"{name}.cfg repeats lines of paper_base.cfg"
