"""TFDS builders (manual download, array_record) for the notes corpus, MedNLI and the i2b2 NER sets.

Importing this package registers `clinical_notes`, `mednli` and `i2b2` with tensorflow_datasets, so that
`tfds.data_source("i2b2/2010", data_dir=..., download=False)` finds them. Build with
`python -m data_prep.tfds_builders.build --dataset=NAME[/CONFIG] --manual_dir=DIR [--data_dir=DIR]`.
"""

from data_prep.tfds_builders.i2b2 import I2b2
from data_prep.tfds_builders.mednli import Mednli
from data_prep.tfds_builders.notes import ClinicalNotes

BUILDERS = {builder.name: builder for builder in (ClinicalNotes, Mednli, I2b2)}
