"""Training and evaluation data: readers of the on-disk formats and the offline corpus builder.

The builder (``python -m engine build-data``) is :func:`engine.data.corpus.build_corpus`; its
parts are :mod:`~engine.data.names` (labels), :mod:`~engine.data.sources` (clip art and emoji),
:mod:`~engine.data.render` (drawing), :mod:`~engine.data.templates` (words) and
:mod:`~engine.data.records` (one record of each kind).  Nothing is imported here, so importing a
reader does not pull in the builder.
"""
