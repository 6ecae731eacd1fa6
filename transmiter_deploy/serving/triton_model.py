"""The model of every Python-backend model in a repository written by :mod:`.triton`, copied there
as ``<model>/1/model.py``; its config's parameters say what it runs (``mode``):

* ``preprocess``: encoded images (BYTES, one per batch row) -> pixels, by the export's preprocess
  record (``preprocess.json`` beside this file): the toolkit's own decoding and open_clip's eval
  transform, as :meth:`.deployment.Deployment.decode` does;
* ``deployment``: the export copied beside this file (``export/``), verified and opened with
  :class:`.deployment.Deployment` on ONNX Runtime: pixels -> every output of the fused graph;
* ``graph``: one graph beside this file (a bank's backbone or one head), its sha256 checked, run
  by the registry's runner.

Requests are answered one by one when they are bad (an error response naming the problem, for
that request only: bytes that are not an image, an empty batch, NaN or infinite pixels) and run
together when good: Triton's dynamic batcher hands several requests to one ``execute``, and one
graph run over all of them is what batching buys. Nothing a client sends ends the stub process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Imported by absolute name: Triton loads this file as a top-level module, outside the package
from transmiter_deploy.errors import InputError, one_line


def check_numpy_bridge(pb_utils: Any) -> None:
    """The stub's tensors and this interpreter's NumPy agree, or a clear error at load time.

    Triton 2.51's Python backend stub (the one nvidia-pytriton 0.7.0 ships) was built for NumPy
    1.x: under NumPy 2 it reads every array with a wrong element size (outputs come back empty,
    BYTES inputs as a repeated first byte, and the stub process dies). A tensor made from another
    tensor's memory and read back shows it: [1, 1, 1, 1] for [1, 2, 3, 4] (``Tensor(name, array)``
    alone hands the same array back; a NumPy array given to ``from_dlpack`` crashes NumPy 1's stub)."""
    probe = np.arange(1, 5, dtype=np.float32)
    try:
        back = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("probe", probe).to_dlpack()).as_numpy()
        same = back.shape == probe.shape and bool(np.array_equal(back, probe))
    except Exception:  # noqa: BLE001 - whatever the broken bridge raises, the answer is the same
        same = False
    if not same:
        raise RuntimeError(f"this Triton Python backend stub cannot exchange arrays with NumPy {np.__version__} "
                           f"(it was built for NumPy 1.x): give the stub's Python NumPy<2 (docs/serving.md)")


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        check_numpy_bridge(pb_utils)
        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        self.parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.directory = Path(args["model_repository"]) / str(args["model_version"])
        self.input = config["input"][0]["name"]
        self.outputs = [output["name"] for output in config["output"]]
        self.closer: Callable[[], None] = lambda: None
        mode = self.parameters.get("mode")
        if mode == "preprocess":
            self.decode = self._decoder()
        elif mode == "deployment":
            self.infer = self._deployment()
        elif mode == "graph":
            self.infer = self._graph()
        else:
            raise RuntimeError(f"{self.directory}: unknown mode {mode!r} in the model's config parameters")
        self.mode = mode

    def _decoder(self) -> Callable[[bytes, str], np.ndarray]:
        from transmiter_deploy.features.datasets import decode_image_bytes
        from transmiter_deploy.features.preprocess import record_transform

        path = self.directory / "preprocess.json"
        record = json.loads(path.read_text(encoding="utf-8"))["preprocess"]
        transform = record_transform(record, str(path))
        return lambda data, what: transform(decode_image_bytes(data, what)).numpy()

    def _deployment(self) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        from transmiter_deploy.serving.deployment import Deployment

        deployment = Deployment.open(self.directory / self.parameters["export"], self.parameters["runtime"],
                                     self.parameters["precision"])
        self.closer = deployment.close
        return deployment.infer

    def _graph(self) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        from transmiter_deploy.artifacts import sha256_file
        from transmiter_deploy.errors import IntegrityError
        from transmiter_deploy.runtimes.base import GraphFile, RunSettings
        from transmiter_deploy.runtimes.registry import runtime

        for item in self.parameters["sha256"].split(","):
            name, _, digest = item.partition("=")
            if sha256_file(self.directory / name) != digest:
                raise IntegrityError(f"{self.directory / name} does not match the sha256 in the model's config")
        graph = GraphFile(self.directory / self.parameters["graph"], self.parameters["precision"])
        runner = runtime(self.parameters["runtime"]).create(graph, RunSettings()).activate()
        self.closer = runner.deactivate
        return runner.infer_outputs

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.mode == "preprocess":
            return [self._respond(lambda request=request: {self.outputs[0]: self._decode_request(request)})
                    for request in requests]
        responses: list[Any] = [None] * len(requests)
        batches = []
        for index, request in enumerate(requests):
            try:
                batches.append((index, self._pixels(request)))
            except InputError as exc:
                responses[index] = self._error(exc)
        if batches:
            try:
                outputs = self.infer(np.concatenate([batch for _, batch in batches]))
                start = 0
                for index, batch in batches:
                    rows = slice(start, start + len(batch))
                    responses[index] = self._respond(lambda rows=rows: {n: outputs[n][rows] for n in self.outputs})
                    start += len(batch)
            except Exception as exc:  # noqa: BLE001 - a failed run fails these requests, not the server
                for index, _ in batches:
                    responses[index] = self._error(exc)
        return responses

    def _pixels(self, request: Any) -> np.ndarray:
        tensor = self.pb_utils.get_input_tensor_by_name(request, self.input)
        array = np.ascontiguousarray(tensor.as_numpy(), dtype=np.float32) if tensor is not None else None
        if array is None or array.ndim == 0 or len(array) == 0:
            raise InputError(f"input '{self.input}' is empty: send a batch of at least one")
        if not np.isfinite(array).all():
            raise InputError(f"input '{self.input}' holds NaN or infinite values")
        return array

    def _decode_request(self, request: Any) -> np.ndarray:
        tensor = self.pb_utils.get_input_tensor_by_name(request, self.input)
        items = tensor.as_numpy().reshape(-1) if tensor is not None else np.empty(0, dtype=object)
        if len(items) == 0:
            raise InputError(f"input '{self.input}' is empty: send one encoded image per batch row")
        # a BYTES element arrives as bytes (a client's str as its UTF-8 bytes)
        return np.stack([self.decode(bytes(item) if not isinstance(item, str) else item.encode(), f"image {row}")
                         for row, item in enumerate(items)]).astype(np.float32, copy=False)

    def _respond(self, outputs: Callable[[], dict[str, np.ndarray]]) -> Any:
        try:
            tensors = [self.pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs().items()]
        except Exception as exc:  # noqa: BLE001 - answered as this request's error
            return self._error(exc)
        return self.pb_utils.InferenceResponse(output_tensors=tensors)

    def _error(self, exc: BaseException) -> Any:
        """The request's error response: the client's fault (HTTP 400, gRPC INVALID_ARGUMENT) for
        bad input, an internal error for anything else, one line either way."""
        error = self.pb_utils.TritonError
        if isinstance(exc, InputError):
            return self.pb_utils.InferenceResponse(output_tensors=[], error=error(one_line(str(exc)), error.INVALID_ARG))
        text = one_line(f"{type(exc).__name__}: {exc}")
        return self.pb_utils.InferenceResponse(output_tensors=[], error=error(text, error.INTERNAL))

    def finalize(self) -> None:
        self.closer()
