"""Developer tooling: ``compile_check`` (``python -m neuroflow.tooling.compile_check``, the
offline sm_80/sm_90 compile check of every kernel) and ``testing`` (the one tolerance policy).
Import from the modules: this package re-exports nothing.
"""
