"""Downstream evaluation in PyTorch: MedNLI, BIO NER, the hyperparameter grid and the Table-2 report.

`clinical_bert_jax.evaluate` is the command line; the modules here are its parts:
`hf_checkpoint` (model directory, tokenizer, device), `torch_optimizers` (the original optimizers and schedules,
`bert_adam_pt` and `google_adamw_pt`), `training` (fine-tuning loop, prediction), `grid` (grid × seeds, model
selection), `mednli`, `ner`, `report`.
"""

# Label id of positions that do not count in the loss (torch's CrossEntropyLoss ignore_index): set by the NER
# features, used to pad labels in batches. Kept here so that features can be built without importing torch.
IGNORED_LABEL = -100
