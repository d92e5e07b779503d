"""Pretrained CNN backbones: the registry (one entry per backbone: builder, weights, preprocessing, default
fine-tune boundary), the one function that builds a backbone (build), EfficientNet-Lite0 and its
torch-free weight reader. ``python -m pipeline.backbones NAME`` lists a backbone's block boundaries.

Imports from pipeline: core.
"""
