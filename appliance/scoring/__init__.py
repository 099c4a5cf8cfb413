"""Scoring: the stages a journaled input goes through, in the order it meets them.

`admission` (slots: back-pressure) → preparation (`appliance.prepare.pool`, the worker pool) → inference
(`appliance.inference.batcher`) → `finisher` (group commit, disposal, what is observed) with `building`
making each result; `stages` wires them and is the one entry the intake uses.
"""
