"""Turning clinical notes into BERT pretraining and evaluation data."""
