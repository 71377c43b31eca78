"""What every part builds on: errors, generic config checks, hardware, atomic writes,
tokenizers."""
