"""Reproducible two-stage transfer-learning pipeline (prepare → extract → train_head → finetune → evaluate)."""
import os

# TensorFlow's C++ start-up banner (oneDNN, CPU features) would repeat in every stage's DVC log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
