"""Integrations of ``ProjectedAccumulator`` with training frameworks.

Each submodule imports its framework lazily, so importing ``proma_accum`` never needs them:

* :mod:`proma_accum.integrations.hf_trainer`: ``PromaTrainerMixin`` for any
  ``transformers.Trainer`` subclass (needs ``transformers``);
* :mod:`proma_accum.integrations.trl`: ``PromaGRPOTrainer``, TRL's ``GRPOTrainer`` with PROMA
  accumulation (needs ``trl``; install the ``trl`` extra).
"""
