"""Framework backends for sparsestore (plugins in the ``sparsestore.backends`` group).

Each adapter imports its framework; the core :mod:`sparsestore` package never does.
``sparsestore.adapters.tensorflow`` turns a :class:`sparsestore.DataLoader` into a
``tf.data.Dataset``.
"""
