"""``--help`` of each entry point: its own header (what it does, and examples that compose), the
config groups where they apply, its config and the footer; not Hydra's generic text."""

from __future__ import annotations

import re
import shlex

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, run_cli

#: entry point -> its config
ENTRY_POINTS = {
    "train": "train",
    "evaluate": "eval",
    "predict": "predict",
    "export": "export",
    "serve": "serve",
}


def examples(config: str) -> list[list[str]]:
    """The example command lines (indented) of the config's ``hydra.help.header``, split as the
    shell does."""
    header = OmegaConf.load(CONF_DIR / f"{config}.yaml").hydra.help.header
    return [
        shlex.split(line, comments=True)
        for line in header.splitlines()
        if line.startswith("  python -m qa_lightning.")
    ]


@pytest.mark.parametrize(("entry", "config"), ENTRY_POINTS.items())
def test_every_help_example_composes(compose_train, entry: str, config: str) -> None:
    commands = examples(config)
    assert len(commands) >= 2
    for words in commands:
        assert words[:3] == ["python", "-m", f"qa_lightning.{entry}"], words
        overrides = words[3:]
        if "<" in overrides:  # standard input from a file
            overrides = overrides[: overrides.index("<")]
        if "-m" in overrides:  # a sweep: each key's first value
            overrides = [re.sub(r"=([^,]*),.*", r"=\1", o) for o in overrides if o != "-m"]
        compose_train(overrides, config)


@pytest.mark.parametrize(("entry", "groups"), [("train", True), ("serve", False)])
def test_help_shows_the_entry_points_own_text(entry: str, groups: bool) -> None:
    result = run_cli(f"qa_lightning.{entry}", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"python -m qa_lightning.{entry}: ")
    assert ("== Config groups (group=option) ==\ncallbacks: default" in result.stdout) == groups
    assert f"== Config ==\ntask_name: {entry}\n" in result.stdout
    assert result.stdout.rstrip().endswith("--hydra-help Hydra's own options.")
    assert "powered by Hydra" not in result.stdout
