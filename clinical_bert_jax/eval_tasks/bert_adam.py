"""Earlier home of `BertAdam`; the PyTorch fine-tuning optimizers now live in `torch_optimizers`."""

from clinical_bert_jax.eval_tasks.torch_optimizers import (
  BertAdam,
  BertAdamPt,
  NO_DECAY_NAME_PARTS,
  parameter_groups,
  warmup_linear,
)
