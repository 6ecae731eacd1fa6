"""transmiter-deploy: TransMiter adapters, from training to deployment.

The library is the product; the ``transmiter`` CLI is a thin layer over it. The
package is drawn in layers, each importing only the layers below it (see
docs/architecture.md):

- ground floor: :mod:`.errors`, :mod:`.artifacts`, :mod:`.host`;
- :mod:`.method` the paper: logits in, adapters out (adapter, extraction, transfer, plus, evaluation);
- :mod:`.features` images and text towers to cached features and zero-shot heads;
- :mod:`.runtimes` PyTorch, ONNX Runtime and TensorRT behind one runner interface, and the
  registry of runtimes and precisions;
- :mod:`.deploy` adapters folded into graphs and files (fusion, ONNX export, precisions);
- :mod:`.demo` the offline demo world; :mod:`.pipeline` recipes and ``transmiter export``;
  :mod:`.benchmark` the harness; :mod:`.cli` the command line.

The flat module paths of 0.1 (``transmiter_deploy.adapter``, ...) still import, with a
DeprecationWarning, until 0.3 (:mod:`._compat`).
"""

from ._compat import install as _install_compat

__version__ = "0.2.0"

_install_compat()
