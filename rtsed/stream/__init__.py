"""Streaming a model: the torch stream (``model_stream.ModelStream``), the ONNX export of the
offline and step graphs (``onnx_export``) and the onnxruntime stream (``onnx_runtime``)."""
