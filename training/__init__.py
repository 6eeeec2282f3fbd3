"""Training: catalog datasets, the Keras fusion model, evaluation, ONNX export, the registry."""
