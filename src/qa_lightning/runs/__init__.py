"""Training runs: config checks, checkpoint writing and reading, exact resume, callbacks,
the distillation teacher and sweep reports."""
