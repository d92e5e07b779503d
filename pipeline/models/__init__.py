"""What is trained and shipped: the head builder, the stacked model, the temperature layer and model
files with their provenance sidecar (heads), temperature fitting and calibration reports (calibration),
and what both training stages share (training).

Imports from pipeline: core, data, backbones, runtime, extraction.
"""
