"""TFDS builder `clinical_notes`: MIMIC-III NOTEEVENTS or MIMIC-IV-Note notes, read by `data_prep.format_mimic`.

Configs mirror the paper's two pretraining corpora: `all_notes` (every category) and `discharge_summary`. Rows with
ISERROR=1 and empty notes are skipped, as `format_mimic` does by default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from clinical_bert_jax.errors import UserError
from data_prep import format_mimic
from data_prep.tfds_builders import common

MIMIC3_PATTERNS = ("NOTEEVENTS*.csv", "NOTEEVENTS*.csv.gz")


@dataclasses.dataclass(eq=False)
class ClinicalNotesConfig(tfds.core.BuilderConfig):
  """`categories`: CATEGORY names to keep (None = all); `file_patterns`: which manual files to read."""

  categories: tuple[str, ...] | None = None
  file_patterns: tuple[str, ...] = ()


class ClinicalNotes(common.ManualArrayRecordBuilder):
  """Whole clinical notes with their row id and category (one example per note)."""

  name = "clinical_notes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    ClinicalNotesConfig(
      name="all_notes",
      description="All note categories (Clinical BERT's corpus).",
      file_patterns=MIMIC3_PATTERNS + ("discharge.csv*", "radiology.csv*"),
    ),
    ClinicalNotesConfig(
      name="discharge_summary",
      description="Discharge summaries only (Discharge Summary BERT).",
      categories=("Discharge summary",),
      file_patterns=MIMIC3_PATTERNS + ("discharge.csv*",),
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put NOTEEVENTS.csv.gz (MIMIC-III v1.4) or discharge.csv.gz / radiology.csv.gz (MIMIC-IV-Note) in the manual
  directory. Both are credentialed PhysioNet data (https://physionet.org/content/mimiciii/1.4/,
  https://physionet.org/content/mimic-iv-note/): a credentialed account, the CITI training and the signed data
  use agreement are required. Subdirectories are searched.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Clinical notes as stored in MIMIC (full text, unsplit), with ROW_ID / note_id and category. "
      f"{self.builder_config.description}",
      features=tfds.features.FeaturesDict(
        {
          "row_id": tfds.features.Text(),
          "category": tfds.features.Text(),
          "text": tfds.features.Text(),
        }
      ),
      supervised_keys=None,
      homepage="https://physionet.org/content/mimiciii/1.4/",
      citation="Johnson et al., MIMIC-III, a freely accessible critical care database, Scientific Data 2016.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = self.manual_path(dl_manager)
    files = common.find_files(manual, self.builder_config.file_patterns)
    if not files:
      raise UserError(
        f"{manual}: no {' or '.join(self.builder_config.file_patterns)} file; "
        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]}"
      )
    return {"train": self._generate_examples(files)}

  def _generate_examples(self, files: list[Path]):
    categories = self.builder_config.categories
    for path in files:
      stats = format_mimic.NoteStats()
      for note in format_mimic.iter_notes(path, categories=list(categories) if categories else None, stats=stats):
        yield f"{path.name}:{note.row_id}", {"row_id": note.row_id, "category": note.category, "text": note.text}
      logging.info("%s: %d notes (%d rows; skipped %s)", path, stats.notes, stats.rows, dict(stats.skipped))
