"""Firing measurements: how often NeuralDB's cosine gate fires, on what, and at what cost to recall.

Research programs, run from the command line (they are not tests and pytest does not collect them):

* ``fire_rate.py`` (``neuraldb fire-rate``, ``python -m evals.firing.fire_rate``): the
  false-fire report, i.e. fires on unrelated text for N stored facts, worst offenders and
  paraphrase recall, for each gate with and without the word check. Its parts: ``texts.py``
  (the unrelated and calibration text), ``gates.py`` (the gates and the activations they
  gate), ``recall.py`` (the recall passes), ``report.py`` (rendering and JSON).
* ``gate_variants.py`` (``neuraldb gate-variants``, ``python -m evals.firing.gate_variants``):
  candidate gate fixes measured on the same activations (bare weights, centring, whitening,
  per-key calibration, top-2 gap, norm range, previous-token check). ``scoring.py`` holds
  its scoring: exact top-2 retrieval, per-key maxima, the gate rules and their figures.
* ``measure.py``: their shared helpers (facts, passages, cached key group means, generated
  facts), also used by the model-level properties in ``properties/``.
* ``vocabulary.py``: the syllables and relations of generated facts, shared with the
  Hypothesis strategies.

Importing this package imports nothing else; each module imports ``torch`` and ``neuraldb``.
"""
