"""Video in and out: ``decode`` (PyAV decoding into RGB frames), ``overlay`` (overlay videos and
timelines), ``synthetic`` (synthetic clips), ``output_folder`` (output folders).
Import from the modules: this package re-exports nothing.
"""
