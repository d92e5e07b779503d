"""The fine-tune recipe and its machinery: the recipe itself (recipe: optimizer, schedule, unfreezing,
BatchNorm folding, EMA, best-epoch tracking), the cut of the stacked model into a frozen bottom and a
trainable top (cut), the bottom's cached activations (activations), the epoch-indexed training stream
(stream) and the per-epoch checkpoint (checkpoint).

Imports from pipeline: core, data, backbones, runtime, extraction, models.
"""
