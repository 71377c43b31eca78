"""Logits -> answers: span decoding (v1/v2), ranking, SQuAD EM/F1 and the settings they use."""
