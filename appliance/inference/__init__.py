"""Backends that run a model on a batch, and the batcher that feeds them."""
