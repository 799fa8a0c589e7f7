"""Bag-level training: labels and splits, one-fold training, cross-validation, metrics."""
