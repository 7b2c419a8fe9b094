"""Benchmarks of sparsestore against the usual ways of feeding a sparse matrix to training.

Run ``python -m benchmarks.run [--quick|--tiny] [--out benchmarks/results]``; see
:mod:`benchmarks.run` for what is measured and how.
"""
