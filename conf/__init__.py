"""The Hydra configs (``train.yaml``, ``eval.yaml``, ``predict.yaml``, ``export.yaml`` and their
groups). A package so that the build installs this directory as ``qa_lightning.conf``, where the
entry points' ``@hydra.main(config_path="conf")`` finds it, in a wheel and in an editable install
alike (see ``[tool.setuptools]`` in ``pyproject.toml``)."""
