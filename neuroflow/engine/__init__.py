"""The engine: :class:`neuroflow.NeuroFlow` (``engine.py``) and its parts.

``architectures`` (A/B/C/KV: encoder, cache, readout), ``streams`` (per-stream state and its
rollback), ``capacity`` (capacity buckets), ``graphs`` (CUDA graphs), ``state_file`` (saved
state), ``memory`` (how many streams fit), ``presets`` (named defaults), ``validation`` (input
checks), ``profiling`` (stage timers), ``compat`` (the reference code's class names).
Import from the modules: this package re-exports nothing.
"""
