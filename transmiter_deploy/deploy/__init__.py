"""Deploy: adapters folded into graphs and files.

This layer owns the folded head and the fused classifier (:mod:`.fusion`), the ONNX
export and its verification (:mod:`.onnx_export`), one converter per reduced precision
(:mod:`.precisions`), ``head.safetensors`` (:mod:`.head_weights`) and MACs counted from
graphs (:mod:`.graph_cost`). It may import ``method``, ``features``, ``runtimes`` and the
ground floor.
"""
