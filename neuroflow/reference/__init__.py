"""Plain-PyTorch references of the device ops (one module per op, ``<op>_reference`` in each):
the designated CPU path, and what every kernel is tested against. See :mod:`neuroflow.ops`."""
