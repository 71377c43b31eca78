"""Answering with a trained model: the answerer (PyTorch or ONNX), jsonl input and output,
exports (Hugging Face, ONNX, int8), and the HTTP server (:mod:`qa_lightning.serving.server`,
needs the serve extra) with its page."""
