"""Property-based tests of NeuralDB's gate and store (issue 5).

``pytest properties`` (``HYPOTHESIS_PROFILE=ci|dev|thorough``, default dev):

* ``strategies.py``: fact sets (generated names, templated relations, unique subjects),
  unrelated prompts (mention no stored subject), synthetic key sets (up to 100,000 x 1536).
* ``test_store_properties.py``: exact top-1 vs brute force, recall at 100,000 keys,
  add/remove/update independence, insertion order, batched == single, chunked ==
  unchunked, save/load identity, monotonicity in gamma, bfloat16 storage; the word check
  (``neuraldb.words``) is exact suffix matching of the subject's tokens, in one call or two.
* ``test_model_properties.py``: SmolLM2 with CounterFact + generated keys: bit-identical
  logits and zero fires on unrelated text, recall, real edits removed exactly, batching,
  gamma, bfloat16, save/load with the model.

The research programs that measure firing (the false-fire report, the gate variants study)
and their helpers live in :mod:`evals.firing` (``neuraldb fire-rate``, ``neuraldb
gate-variants``); ``python -m properties.fire_rate`` and ``python -m properties.study`` are
deprecated shims that warn and forward there.
"""
