"""clinical_bert_jax: JAX/Flax reproduction of Clinical BERT (Alsentzer et al., 2019).

`clinical_bert_jax.load(path)` returns a model you can call on text (see `clinical_bert_jax.api`).
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
  """See `clinical_bert_jax.api.load` (imported lazily: JAX is not needed to import the package)."""
  from clinical_bert_jax.api import load as _load

  return _load(*args, **kwargs)
