"""Datasets as uint8 tensors (:mod:`.sources`, :mod:`.paper`) and on-device batches
(:mod:`.loader`)."""
