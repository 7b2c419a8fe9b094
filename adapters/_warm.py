"""Imported first by the TensorFlow and JAX adapters: starts loading the compiled
``coo_into`` (:func:`sparsestore.kernels.warm`) on its own thread, so it loads while the
framework imports instead of delaying the first batches.  Not imported by the torch
adapter, whose DataLoader workers may fork while a thread would be importing."""

from sparsestore import kernels

kernels.warm()
