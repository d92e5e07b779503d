"""Bottleneck features: the HDF5 feature files and their provenance (features), the content-addressed
feature cache and its key (cache), what extract computes per image (work) and the Ray Data executor
(ray_executor).

Imports from pipeline: core, data, backbones, runtime.
"""
