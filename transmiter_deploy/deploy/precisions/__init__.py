"""Precision converters: one module per reduced precision, each turning the verified fp32
graph into that precision's graph (``convert(fp32_path, calibration, fp32_nodes)``).
The registry (:mod:`transmiter_deploy.runtimes.registry`) names the converter of each
precision; the export loops over the registry, so a new precision needs no change there.
"""
