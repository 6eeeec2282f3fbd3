"""Training: datasets from the catalog, the Keras fusion model, evaluation, ONNX export and the registry gate."""
