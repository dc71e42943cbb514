"""TFDS builder `i2b2` with configs `2006`, `2010`, `2012`, `2014`: BIO-tagged sentences for ClinicalBERT's NER tasks.

The manual directory holds either the output of `python -m data_prep.i2b2` (train.tsv, dev.tsv, test.tsv) or the
extracted official release, which is then converted on the fly with `data_prep.i2b2`'s default layout and seed. The
labels are ClassLabels in the order of the original `run_ner.py` label lists (`data_prep.i2b2.label_list`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_prep import conll, i2b2
from data_prep.tfds_builders import common

_TASK_DESCRIPTIONS = {
  "2006": "2006 de-identification (8 PHI types)",
  "2010": "2010 concept extraction (problem, treatment, test)",
  "2012": "2012 temporal relations, EVENT spans (6 types)",
  "2014": "2014 de-identification track 1 (23 PHI subtypes)",
}


@dataclasses.dataclass(eq=False)
class I2b2Config(tfds.core.BuilderConfig):
  task: str = ""


class I2b2(common.ManualArrayRecordBuilder):
  """i2b2 / n2c2 NER and de-identification sets, one sentence (note line) per example."""

  name = "i2b2"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: ClinicalBERT's conversion and dev splits."}
  BUILDER_CONFIGS = [
    I2b2Config(name=task, task=task, description=description) for task, description in _TASK_DESCRIPTIONS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the extracted official i2b2 release of the chosen year (or the train.tsv/dev.tsv/test.tsv written by
  `python -m data_prep.i2b2`) in the manual directory. The i2b2 data sets are distributed by the n2c2 / DBMI Data
  Portal (https://portal.dbmi.hms.harvard.edu/projects/n2c2-nlp/) after registration and a signed data use
  agreement. Expected release files: 2006 deid_surrogate_{train_all,test_all_groundtruth}_version2.xml;
  2010 concept_assertion_relation_training_data/, test_data/, reference_standard_for_test_data/;
  2012 2012-07-15.original-annotation.release/, 2012-08-08.test-data.event-timex-groundtruth/xml/;
  2014 training-PHI-Gold-Set1/, training-PHI-Gold-Set2/, testing-PHI-Gold-fixed/.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"i2b2 {_TASK_DESCRIPTIONS[self.builder_config.task]} as BIO-tagged whitespace words, one "
      "example per note line, converted and split as in Alsentzer et al. 2019 (see "
      "docs/downstream-data.md). `index` is the sentence's position in the converted split file.",
      features=tfds.features.FeaturesDict(
        {
          "words": tfds.features.Sequence(tfds.features.Text()),
          "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=i2b2.label_list(self.builder_config.task))),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=("words", "labels"),
      homepage="https://portal.dbmi.hms.harvard.edu/projects/n2c2-nlp/",
      citation="Alsentzer et al., Publicly Available Clinical BERT Embeddings, Clinical NLP Workshop 2019.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = self.manual_path(dl_manager)
    task = self.builder_config.task
    if (manual / "train.tsv").is_file():
      splits = conll.load_bio_dir(manual)
      for split, sentences in splits.items():
        conll.validate_labels(sentences, i2b2.label_list(task), source=manual / f"{split}.tsv")
    else:
      splits = i2b2.convert_release(task, manual).splits
    return {split: self._generate_examples(sentences) for split, sentences in splits.items()}

  def _generate_examples(self, sentences: list[conll.Sentence]):
    for index, sentence in enumerate(sentences):
      yield index, {"words": list(sentence.words), "labels": list(sentence.labels), "index": index}
