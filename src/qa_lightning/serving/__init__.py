"""Answering with a trained model: the answerer (PyTorch or ONNX), jsonl input and output,
exports (Hugging Face, ONNX, int8)."""
