"""Filtering: the margin-calibrated threshold that decides which candidates are kept.

The story: ``calibration`` holds the maths (best-F1 cut, precision/recall band, the within-query
margin, bootstrap; pure NumPy), ``objective`` what a calibration maximises, ``decisions`` the two
decisions calibrated apart (``keep``: which candidates become rows, recall first; ``support``: is
the question answerable, precision first; pure NumPy); ``threshold`` is the filter itself
(``MarginThreshold``: calibrate from an index and qrels, apply both decisions), persisted as
``calibration.json`` (format in ``calibration_file``; ``plot`` draws it, matplotlib optional); ``prior`` ships calibrations per encoder and says which calibration an
index uses; ``synthetic`` calibrates from the user's own documents without labels.

May import: ``nbce_rag.types``, ``config``, ``errors``, ``files`` and ``retrieval`` (the encoder's
identity, the canonical cosine, the qrels readers); never ``decoding`` (synthetic calibration
takes any object with a ``generate`` method), the pipeline or an integration.
"""
