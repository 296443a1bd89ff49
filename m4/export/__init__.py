"""Model -> ONNX bundle (`bundle`, `graphs`, `ort_graph`: torch) and TensorRT engines from a
bundle (`engines`). What a bundle holds is m4.bundle_format, which the runtime reads too."""
