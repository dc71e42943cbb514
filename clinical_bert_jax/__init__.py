"""clinical_bert_jax: JAX/Flax reproduction of Clinical BERT (Alsentzer et al., 2019)."""

__version__ = "0.1.0"
