"""Preparation: decode and preprocess each input once, in worker processes."""
