"""Images in: decoding and resizing (images), walking a dataset folder (scanning), decode-ahead and tf.data
input pipelines (datasets), and the keyed, reproducible training augmentation (augment).

Imports from pipeline: core.
"""
