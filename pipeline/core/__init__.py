"""Foundations every other package stands on: params (params.yaml → validated dataclasses), atomic file
writes and hashing (io), the split manifest, provenance checks, the chunked on-disk cache protocol, and
the import closure that derives dvc.yaml's deps and the feature-cache key from the code.

Imports from pipeline: nothing outside core.
"""
