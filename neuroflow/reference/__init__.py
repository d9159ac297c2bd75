"""Plain-PyTorch references of the device ops (one module per op, ``<op>_reference`` in each):
the designated CPU path, and what every kernel is tested against. See :mod:`neuroflow.ops`.

``gate_settings`` holds :class:`GateSettings`: the gate's options and the rule they
define, which the gate reference implements and the launcher and the engine take.
"""
