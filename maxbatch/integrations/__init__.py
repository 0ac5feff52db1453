"""maxbatch where people train: Lightning and the Hugging Face Trainer.

Each integration is its own module and imports its framework only when it is imported itself
(``import maxbatch`` imports neither):

- :mod:`maxbatch.integrations.lightning`: the ``MaxBatch`` callback (``pip install
  'maxbatch[lightning]'``).
- :mod:`maxbatch.integrations.transformers`: ``tune(trainer)`` and the ``MaxBatchCallback``
  (``pip install 'maxbatch[transformers]'``).
"""
