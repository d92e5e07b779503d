"""Fine-tuning the top of the stacked model: the recipe itself (recipe: optimizer, schedule, unfreezing,
BatchNorm folding, EMA, best-epoch tracking), the cut of the stacked model into a frozen bottom and a
trainable top (cut), the bottom's cached activations (activations), the epoch-indexed training stream
(stream), the per-epoch checkpoint (checkpoint), fitting with resume (trainer), the parity checks of
what is saved (parity) and what a run shows while it runs (progress).

Imports from pipeline: core, data, backbones, runtime, extraction, models.
"""
