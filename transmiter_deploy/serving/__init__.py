"""Serving what the toolkit exports: an export opened and run on a registered runtime
(:mod:`.deployment`), and what serves it (``transmiter predict``, Triton model repositories).

This layer sits above ``runtimes/`` and ``deploy/``: it reads an export as written and runs it
through the registry's runners, with the same preprocessing as training and the C++ runtime.
"""
