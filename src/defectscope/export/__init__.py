"""Deployment export: a fitted detector as one self-contained ONNX graph, its metadata and checks.

:mod:`.graph` traces a detector's :meth:`~defectscope.methods.Detector.export_module` into ONNX;
:mod:`.onnx_file` writes and reads exported files (metadata, checksums, safety checks);
:mod:`.parity` compares an engine with the torch model on the same images.
"""
