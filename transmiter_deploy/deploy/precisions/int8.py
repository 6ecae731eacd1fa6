"""int8 with explicit quantisation (QuantizeLinear/DequantizeLinear): NVIDIA ModelOpt ONNX PTQ.

TensorRT 11 builds int8 only from Q/DQ graphs, and ONNX Runtime's CPU provider runs them with
int8 kernels. ModelOpt quantises the GEMMs, convolutions and element-wise Add/Mul and keeps
LayerNorm, Softmax and GELU in higher precision (fp32 here: ``high_precision_dtype``); the
statistic nodes (feature normalisation, mean, sigma, de-standardisation) are excluded by name,
exactly as in the fp16 path.

Calibration method, chosen on the demo world (``export/recipes/demo.yaml``, 128 seeded
training images, 800 test images, TM-Demo-Target): entropy agreed with the fp32 graph on
100.0% of top-1 predictions (accuracy 99.375% both), max on 99.875% (99.25%); ModelOpt offers
only these two for int8. Weights are quantised per output channel by ModelOpt's int8 mode and
stored as int8 with a DequantizeLinear only (ModelOpt's ``dq_only``): about a quarter of the
weights' bytes, and the same computation as a QuantizeLinear -> DequantizeLinear pair on the fp32
weight (the stored values are that QuantizeLinear's outputs; tests/test_int8.py compares the two
graphs' logits). Activations keep their Q/DQ pairs, whose scales calibration chose.
ModelOpt selects none of the folded head's GEMMs for quantisation (measured on the demo and
ViT-B-16 graphs), so the head inside ``model_int8.onnx`` stays fp32 and no ``head_int8.onnx``
is written (deploy/precision_edits.py): only the image tower is int8. A graph that fails its accuracy
gate gets its most sensitive quantised nodes kept in fp32 afterwards (deploy/qdq_fallback.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ...errors import DependencyError, InputError
from ...runtimes.onnx_files import external_data_locations, graph_structure
from ..fusion import FP32_NODES

CALIBRATION_METHOD = "entropy"


class _BiasWarnings(logging.Filter):
    """ONNX Runtime's Q/DQ quantizer warns on the root logger once per bias that is not an
    initialiser ("Expected bias ... to be an initializer": 157 lines for MobileCLIP-S1's graph
    when onnxslim could not fold them): counted here, said in one line by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Expected bias"):
            self.names.append(message)
            return False
        return True


@contextlib.contextmanager
def _counted_bias_warnings():
    counter = _BiasWarnings()
    root = logging.getLogger()
    root.addFilter(counter)
    try:
        yield counter.names
    finally:
        root.removeFilter(counter)


def convert(fp32_path: Path, calibration: dict[str, np.ndarray],
            fp32_nodes: tuple[str, ...] = FP32_NODES, per_node: bool = False,
            weights_int8: bool = True) -> onnx.ModelProto:
    """The Q/DQ graph of ``fp32_path``, calibrated on ``calibration`` (the graph's one input).
    ``per_node``: ModelOpt calibrates one node at a time (``calibrate_per_node``), for less memory.
    ``weights_int8``: weights stored as int8 behind a DequantizeLinear (else fp32 behind a Q/DQ
    pair: the form before, kept for the test that compares the two)."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise DependencyError("the int8 export needs NVIDIA ModelOpt: pip install 'transmiter-deploy[int8]'") from exc
    if len(calibration) != 1:
        raise InputError(f"int8 calibration needs the graph's one input, got {sorted(calibration)}")
    data = next(iter(calibration.values()))
    if data.ndim < 2 or data.shape[0] < 1 or not np.isfinite(data).all():
        raise InputError(f"int8 calibration data must be a finite batch, got shape {data.shape}")
    with tempfile.TemporaryDirectory(prefix="transmiter-int8-") as work:
        # ModelOpt rewrites its input file in place (seen: model.onnx re-saved during quantize), so
        # it gets a copy: an artifact is never written by anyone but its own export.
        source, output = Path(work) / "model.onnx", Path(work) / "model_int8.onnx"
        shutil.copyfile(fp32_path, source)
        # a graph with external data names its data files relative to itself: they go beside the copy
        for location in external_data_locations(graph_structure(Path(fp32_path))):
            shutil.copyfile(Path(fp32_path).parent / location, Path(work) / location)
        # ModelOpt logs at INFO, and at ERROR when NVML is absent (every CPU-only machine:
        # "Failed to get GPU count", harmless). Its failures raise, so its log is silenced.
        logging.getLogger("modelopt").setLevel(logging.CRITICAL)
        # ONNX Runtime's entropy calibrator prints its histogram sizes to stdout, where the CLI
        # writes its results, and ModelOpt's calibration draws tqdm bars on stderr whatever the
        # caller's --quiet says: both kept out (logging handlers keep their own streams, so
        # ModelOpt's warnings still show)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                _counted_bias_warnings() as computed_biases:
            quantize(str(source), quantize_mode="int8", calibration_data=data.astype(np.float32),
                     calibration_method=CALIBRATION_METHOD, calibration_eps=["cpu"], high_precision_dtype="fp32",
                     nodes_to_exclude=list(fp32_nodes), output_path=str(output), log_level="CRITICAL",
                     calibrate_per_node=per_node, dq_only=weights_int8)
        if computed_biases:
            logging.getLogger(__name__).warning(
                f"warning: int8: {len(computed_biases)} biases of {Path(fp32_path).name} are computed in the graph, "
                "not stored, and stay fp32 (ONNX Runtime's quantizer)")
        model = onnx.load(str(output))  # with the external data ModelOpt wrote beside it, if any
    onnx.checker.check_model(model, full_check=True)
    return model

