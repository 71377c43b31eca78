"""Serving answers: the HTTP server (:mod:`qa_lightning.serving.server`) and its page."""
