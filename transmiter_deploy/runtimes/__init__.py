"""Runtimes: where a graph or a module runs, behind one runner interface.

This layer owns one module per runtime (:mod:`.pytorch`, :mod:`.onnxruntime`,
:mod:`.tensorrt`), each holding its loader next to its runner; :mod:`.base` (the
runner life cycle and input checks), :mod:`.compare` (the comparator, judged by
the tolerances of :mod:`.registry`), and :mod:`.registry`, the runtimes and
precisions the toolkit knows, as data. It imports only the ground floor
(``errors``, ``artifacts``, ``host``); nothing here knows about adapters or heads.
This ``__init__`` imports nothing, so the registry loads without torch.
"""
