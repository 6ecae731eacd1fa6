"""The folded head as plain tensors (``head.safetensors``), for runtimes without ONNX.

The C++ head backend (``cpp/``) and any other runtime that already has the
image features read this file instead of ``head.onnx``: the same folded
matrices (docs/method.md, "Deployment algebra"), the adapter's MLP blocks and the scalars that
define the computation, so no graph interpreter is needed.

Tensors (float32, little-endian, row-major; ``d`` feature width, ``D`` latent
width, ``H = mlp_ratio * D``, ``K`` task classes):

=========================  ========  ==============================================
name                       shape     role
=========================  ========  ==============================================
``mean_vector``            (d,)      ``mu = f . mean_vector + logit_bias``
``push``                   (d, D)    ``x = f push / (sigma + eps)``
``gram``                   (d, d)    only when ``sigma_mode`` is ``gram``
``pull``                   (D, K)    task columns of the tied basis
``blocks.{i}.norm.weight`` (D,)      LayerNorm scale (``layer_norm_eps``)
``blocks.{i}.norm.bias``   (D,)      LayerNorm shift
``blocks.{i}.fc1.weight``  (H, D)    PyTorch ``Linear`` layout (out, in)
``blocks.{i}.fc1.bias``    (H,)
``blocks.{i}.fc2.weight``  (D, H)
``blocks.{i}.fc2.bias``    (D,)
=========================  ========  ==============================================

The scalars are in the safetensors ``__metadata__`` (strings; floats written
with ``repr`` so they round-trip exactly); ``logit_bias`` (SigLIP's) is there only where it is
not 0, and a reader without it takes 0. The input is the image feature,
raw or L2-normalised: runtimes L2-normalise it first (``f / max(||f||, 1e-12)``,
as ``model.onnx`` does to the backbone output; ``head.onnx`` expects features
already normalised).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_tensors, sha256_bytes
from ..errors import InputError, IntegrityError
from .fusion import FoldedHead

HEAD_FORMAT = "transmiter-deploy/folded-head"  # heads.FORMAT tags the zero-shot head artifact
HEAD_FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
NORMALISE_EPS = 1e-12  # torch.nn.functional.normalize's default


def head_tensors(folded: FoldedHead) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``head.safetensors`` for a folded head."""
    blocks = list(folded.blocks)
    for block in blocks:
        # The runtimes implement exactly these; anything else would be computed wrongly.
        if not isinstance(block.act, torch.nn.GELU) or block.act.approximate != "none":
            raise IntegrityError("head.safetensors supports the exact (erf) GELU only")
        if block.norm.eps != blocks[0].norm.eps or block.alpha != blocks[0].alpha:
            raise IntegrityError("head.safetensors needs the same LayerNorm eps and alpha in every block")
    tensors: dict[str, torch.Tensor] = {
        "mean_vector": folded.stats.mean_vector.reshape(-1),
        "push": folded.push,
        "pull": folded.pull,
    }
    if folded.stats.gram is not None:
        tensors["gram"] = folded.stats.gram
    for index, block in enumerate(blocks):
        for part in ("norm", "fc1", "fc2"):
            layer = getattr(block, part)
            tensors[f"blocks.{index}.{part}.weight"] = layer.weight
            tensors[f"blocks.{index}.{part}.bias"] = layer.bias
    tensors = {name: t.detach().float().contiguous() for name, t in tensors.items()}
    feature_dim, latent_dim = folded.push.shape
    metadata = {
        "format": HEAD_FORMAT,
        "format_version": str(HEAD_FORMAT_VERSION),
        "feature_dim": str(int(feature_dim)),
        "latent_dim": str(int(latent_dim)),
        "hidden_dim": str(int(blocks[0].fc1.out_features)) if blocks else "0",
        "num_layers": str(len(blocks)),
        "num_task_classes": str(int(folded.num_task_classes)),
        "sigma_mode": folded.sigma_mode,
        "dof": str(int(folded.stats.dof)),
        "eps": repr(float(folded.stats.eps)),
        "alpha": repr(float(blocks[0].alpha)) if blocks else "1.0",
        "layer_norm_eps": repr(float(blocks[0].norm.eps)) if blocks else "1e-05",
        "activation": "gelu-erf",
        "input_normalisation": "l2",
        "normalise_eps": repr(NORMALISE_EPS),
        "output": "logits",
    }
    if folded.stats.logit_bias:
        metadata["logit_bias"] = repr(float(folded.stats.logit_bias))
    return tensors, metadata


def write_head_safetensors(folded: FoldedHead, path: Path) -> str:
    """Write ``head.safetensors``; returns its sha256."""
    from safetensors.torch import save

    tensors, metadata = head_tensors(folded)
    data = save(tensors, metadata=metadata)
    Path(path).write_bytes(data)
    return sha256_bytes(data)


def read_head_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return dict(handle.metadata() or {})


def head_logits_numpy(path: Path, features: np.ndarray, expected_sha256: str | None = None) -> np.ndarray:
    """The head computed from ``head.safetensors`` alone, in float64 numpy.

    A second, independent reading of the file (no torch module involved) that
    tests compare with ``FoldedHead`` and with the C++ runtime.
    """
    tensors = {k: v.double().numpy() for k, v in load_tensors(path, expected_sha256, "head weights").items()}
    meta: dict[str, Any] = read_head_metadata(path)
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(f).all(axis=1))
    if bad.size:
        raise InputError(f"feature row {int(bad[0])} holds NaN or inf")
    # a zero (or vanishing) row has no direction: as the C++ head backend, refuse it
    vanishing = np.flatnonzero(norms[:, 0] <= float(meta["normalise_eps"]))
    if vanishing.size:
        raise InputError(f"feature row {int(vanishing[0])} has zero norm and cannot be L2-normalised")
    f = f / np.maximum(norms, float(meta["normalise_eps"]))
    mu = f @ tensors["mean_vector"][:, None] + float(meta.get("logit_bias", "0.0"))
    pushed = f @ tensors["push"]
    if meta["sigma_mode"] == "gram":
        sum_squares = ((f @ tensors["gram"]) * f).sum(axis=1, keepdims=True)
    else:
        sum_squares = (pushed * pushed).sum(axis=1, keepdims=True)
    sigma = np.sqrt(sum_squares / int(meta["dof"]))
    x = pushed / (sigma + float(meta["eps"]))
    for i in range(int(meta["num_layers"])):
        t = lambda name: tensors[f"blocks.{i}.{name}"]  # noqa: E731
        mean = x.mean(axis=1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
        h = (x - mean) / np.sqrt(var + float(meta["layer_norm_eps"])) * t("norm.weight") + t("norm.bias")
        h = h @ t("fc1.weight").T + t("fc1.bias")
        h = 0.5 * h * (1.0 + torch.special.erf(torch.from_numpy(h / np.sqrt(2.0))).numpy())
        x = x + float(meta["alpha"]) * (h @ t("fc2.weight").T + t("fc2.bias"))
    return (x @ tensors["pull"]) * sigma + mu
