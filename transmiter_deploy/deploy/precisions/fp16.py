"""Mixed fp16 for TensorRT's strongly typed networks: NVIDIA ModelOpt AutoCast.

fp16 weights and GEMMs; the feature normalisation, the statistics (mean, sigma, the
division by sigma) and the de-standardisation stay fp32, and so do the graph's inputs
and outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from ...errors import DependencyError
from ..consumer_safety import move_transposes_after_matmuls
from ..fusion import FP32_NODES


def convert(fp32_path: Path, calibration: dict[str, np.ndarray],
            fp32_nodes: tuple[str, ...] = FP32_NODES) -> onnx.ModelProto:
    """ModelOpt AutoCast with ``fp32_nodes`` (name regexes) forced to fp32 and fp32 graph I/O.

    AutoCast alone keeps a node fp32 only if the calibration data drive it past
    |512|; deployment inputs can be larger than any calibration set, so the
    statistic nodes are named explicitly.
    """
    try:
        from modelopt.onnx.autocast import configure_logging, convert_to_mixed_precision
    except ImportError as exc:
        raise DependencyError(
            "the fp16 export needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]==0.47.*' "
            "(or export with --no-fp16)"
        ) from exc
    import onnxruntime

    # AutoCast logs every node it visits at INFO (its own logger; keep warnings)
    # and lowers ONNX Runtime's log level process-wide (restored afterwards).
    configure_logging(logging.WARNING)
    try:
        # from the path: AutoCast loads the graph with its external data (read from beside it)
        model = convert_to_mixed_precision(
            str(fp32_path), low_precision_type="fp16", keep_io_types=True,
            nodes_to_exclude=list(fp32_nodes), calibration_data=calibration, providers=["cpu"],
        )
    finally:
        onnxruntime.set_default_logger_severity(2)
    # ONNX Runtime's default CPU optimiser segfaults on AutoCast's Transpose -> MatMul chains
    # (consumer_safety.py): the rewrite keeps every value and lets default sessions load the graph
    move_transposes_after_matmuls(model)
    onnx.checker.check_model(model, full_check=True)
    return model
