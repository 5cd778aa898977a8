"""The command lines (``python -m rtsed.live``, ``rtsed.detect``, ``rtsed.export``); the
modules rtsed/live.py, rtsed/detect.py and rtsed/export.py keep those module paths."""
