"""Pretrained CNN backbones: the registry (one entry per backbone: builder, weights, preprocessing, native
size, default fine-tune boundary), the one function that builds a backbone and its provenance (build),
where weights files live on this machine (weights), EfficientNet-Lite0/1/2 and their torch-free weight reader
(efficientnet_lite, torch_legacy). ``python -m pipeline.backbones NAME`` lists a backbone's block boundaries.

Imports from pipeline: core.
"""
