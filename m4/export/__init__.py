"""Model -> ONNX bundle. `manifest` is torch-free (the runtime reads bundles with it);
`graphs` and `bundle` need torch and are imported only by `m4 export`."""
