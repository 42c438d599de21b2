"""transfer-serve's state, behind one narrow interface per store.

- :mod:`store.registry`: model versions, the active pointer and its history (:class:`ModelRegistry`)
- :mod:`store.labels`: labelled images (:class:`LabelStore`)
- :mod:`store.embeddings`: backbone embeddings by image and backbone (:class:`EmbeddingCache`)
- :mod:`store.jobs`: retrain job records, one running at a time (:class:`JobStore`)
- :mod:`store.predictions`: kept predictions and their images, for review (:class:`PredictionStore`)
- :mod:`store.errors`: writes the state cannot take, for the operator (:class:`StorageError`)
- :mod:`store.local`: the single-machine backend, SQLite + files in ``TRANSFER_SERVE_HOME``

Callers (the service, its retrain jobs, the training CLI) get the stores from
:func:`store.state.open_state`, which reads :class:`store.settings.StoreSettings`, and depend on
the interfaces only. Layers, one way: ``models`` <- ``store`` <- ``service``, ``training``.
"""
