"""Builds one of our TFDS datasets from its manually downloaded files (array_record, readable without TensorFlow).

    python -m data_prep.tfds_builders.build --dataset=i2b2/2010 --manual_dir=RELEASE_DIR [--data_dir=DIR] [--overwrite]

`--dataset` is `mednli`, `clinical_notes/all_notes`, `clinical_notes/discharge_summary` or `i2b2/{2006,2010,2012,2014}`.
The dataset lands in DATA_DIR/NAME/CONFIG/VERSION (default DATA_DIR: ~/tensorflow_datasets, or $TFDS_DATA_DIR).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow_datasets as tfds
from absl import flags, logging

from clinical_bert_jax.errors import UserError, run_absl
from data_prep.tfds_builders import BUILDERS


def make_builder(dataset: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Our builder for `NAME[/CONFIG]`, without tfds' catalogue lookup (which may try the network)."""
  name, _, config = dataset.partition("/")
  if name not in BUILDERS:
    raise UserError(f"--dataset={dataset}: unknown dataset; choose one of {', '.join(available_datasets())}")
  builder_class = BUILDERS[name]
  configs = [c.name for c in builder_class.BUILDER_CONFIGS]
  if configs and config not in configs:
    raise UserError(
      f"--dataset={dataset}: {name} needs a config, one of {', '.join(configs)} (e.g. {name}/{configs[0]})"
    )
  if not configs and config:
    raise UserError(f"--dataset={dataset}: {name} has no configs; use --dataset={name}")
  return builder_class(config=config or None, data_dir=data_dir)


def available_datasets() -> list[str]:
  return [
    f"{name}/{config.name}" if builder.BUILDER_CONFIGS else name
    for name, builder in BUILDERS.items()
    for config in (builder.BUILDER_CONFIGS or [None])
  ]


def build(
  dataset: str, manual_dir: str, data_dir: str | None = None, overwrite: bool = False
) -> tfds.core.DatasetBuilder:
  """Prepares `dataset` from `manual_dir` (reusing an existing copy unless `overwrite`); returns the builder."""
  builder = make_builder(dataset, data_dir)
  mode = (
    tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode))
  return builder


def _define_flags() -> None:
  flags.DEFINE_string("dataset", None, "NAME[/CONFIG]: " + ", ".join(available_datasets()))
  flags.DEFINE_string("manual_dir", None, "Directory with the manually downloaded (credentialed) files.")
  flags.DEFINE_string("data_dir", None, "TFDS data directory (default: ~/tensorflow_datasets or $TFDS_DATA_DIR).")
  flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already prepared.")
  flags.mark_flags_as_required(["dataset", "manual_dir"])


def main(argv: Sequence[str]) -> None:
  values = flags.FLAGS
  builder = build(values.dataset, values.manual_dir, values.data_dir, values.overwrite)
  sizes = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
  logging.info("%s ready in %s (%s)", values.dataset, builder.data_dir, sizes)
  print(f"{values.dataset}: {builder.data_dir} ({sizes})")


if __name__ == "__main__":
  _define_flags()
  run_absl(main)
