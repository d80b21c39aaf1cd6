"""Graph exports (installed as `ldmrt.export`): ONNX, TensorRT, compiled forms for C++ hosts."""
