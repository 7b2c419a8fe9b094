"""Benchmarks of sparsestore against the usual ways of feeding a sparse matrix to training.

Run ``python -m benchmarks list`` for what there is, ``python -m benchmarks NAME [args]`` for
one (``suite``: :mod:`benchmarks.run`), ``python -m benchmarks report`` to rebuild the pages
of ``benchmarks/results`` from their json (:mod:`benchmarks.records`).
"""
