"""The files that rebuild a model without its base: config and tokenizer, kept in checkpoints.

A checkpoint stores them under :data:`CHECKPOINT_KEY` as plain Python values (the config as the
dict ``config.json`` holds, the tokenizer as the text of the files ``save_pretrained`` writes),
so that it stays loadable with ``torch.load(weights_only=True)``. :func:`write_model_files` turns
them back into a directory that ``from_pretrained`` reads: a model directory without weights.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qa_lightning.core.errors import ConfigError

#: Checkpoint key of the embedded files.
CHECKPOINT_KEY = "qa_model_files"
CONFIG_FILE = "config.json"


def model_files(config: Any, tokenizer: Any | None) -> dict[str, Any]:
    """``{"config": dict, "tokenizer": {file: text}, "tokenizer_base64": {file: base64}}`` of a
    transformers config and tokenizer (``tokenizer_base64`` only for binary files, such as a
    SentencePiece model; no ``tokenizer`` entries without a tokenizer).

    The config is complete (``use_diff=False``): a later transformers with other defaults
    rebuilds the same architecture.
    """
    files: dict[str, Any] = {"config": json.loads(config.to_json_string(use_diff=False))}
    if tokenizer is None:
        return files
    texts, binaries = {}, {}
    with tempfile.TemporaryDirectory(prefix="qa_lightning_tokenizer_") as directory:
        tokenizer.save_pretrained(directory)
        for path in sorted(Path(directory).rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(directory).as_posix()
            data = path.read_bytes()
            try:
                texts[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                binaries[name] = base64.b64encode(data).decode("ascii")
    files["tokenizer"] = texts
    if binaries:
        files["tokenizer_base64"] = binaries
    return files


def has_config(files: Any) -> bool:
    return isinstance(files, dict) and isinstance(files.get("config"), dict)


def has_tokenizer(files: Any) -> bool:
    return isinstance(files, dict) and bool(files.get("tokenizer"))


def write_model_files(files: dict[str, Any], directory: str | Path) -> Path:
    """Write the embedded config and tokenizer files into ``directory``; returns it.

    Each file is written to a temporary name and renamed, so that processes writing the same
    files at once (DDP ranks) never read a half-written one.
    """
    directory = Path(directory)
    contents: dict[str, bytes] = {}
    if has_config(files):
        contents[CONFIG_FILE] = json.dumps(files["config"], indent=2, sort_keys=True).encode()
    for name, text in (files.get("tokenizer") or {}).items():
        contents[name] = text.encode("utf-8")
    for name, data in (files.get("tokenizer_base64") or {}).items():
        contents[name] = base64.b64decode(data)
    for name, data in contents.items():
        path = directory / name
        if directory.resolve() not in path.resolve().parents:
            raise ConfigError(
                f"the checkpoint embeds a file named {name!r}, outside its model directory; "
                "the checkpoint is damaged or not one of qa_lightning's."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_bytes(data)
        os.replace(partial, path)
    return directory
