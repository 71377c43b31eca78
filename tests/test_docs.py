"""The docs are tests: every shell command of README.md and docs/*.md runs here, or is marked in
the doc with the reason it cannot (tests/docs_commands.py reads them, at test time).

- ``test_command_composes`` (quick): each ``python -m qa_lightning.<entry point>`` of every
  command, marked ones included, composes its Hydra config with the documented overrides (sweeps
  take their first value), so a renamed key or config option fails here first.
- ``test_command_runs``: each unmarked command runs with bash in a directory of its block (links
  to this repository's files, its own ``outputs/``), after the block's context lines and earlier
  commands, on the shipped demo data. The README's "After the demo" commands and ``make`` checks
  are quick; the rest are slow.

Placeholders are filled from runs the tests make (:class:`DocRuns`): ``outputs/train/RUN`` (also
``TEACHER``, ``$RUN``, ``$S``) is a run of ``experiment=demo model=tiny`` with :data:`CHEAP_TRAIN`,
``best-....ckpt`` (``best-epoch01-f148.22.ckpt``) its best checkpoint, ``ckpt_path=...`` that
checkpoint, ``outputs/export/RUN`` (``DATE``) its fp32 and int8 ONNX exports; ``$M`` and ``$T``
(a fine-tuned MiniLM in the docs) a ``model=minilm data=demo`` run, ``$FP32`` and ``$INT8`` its
exports; ``<date>`` the newest match in the block's directory; a lone ``...`` is dropped.
``$SQUAD``, ``$VAL``, ``QA_SQUAD_DIR`` and ``../shared/data/squad`` stand for the shared SQuAD
split with the demo files repeated (:data:`SQUAD_COPIES`); ``train.json``, ``dev.json``,
``train.csv``, ``dev.csv``, ``NewsQA.jsonl.gz``, ``NewsQA-dev.jsonl.gz`` and ``questions.jsonl``
are the demo files in those formats.

Cheaper runs (appended to the documented words, which all stay, so a renamed key or option still
fails): training adds ``model=tiny`` unless the command names a model, ``data=demo`` unless it
names data or an experiment, and :data:`CHEAP_TRAIN` (fewer questions, one epoch); evaluation and
int8 exports fewer questions; benchmark scripts ``--quick``; ``serve``, ``tensorboard`` and
``mlflow ui`` a free port (they run until they answer, then get SIGTERM); ``curl`` is pointed at
a server the tests start; ``pytest`` commands only collect (the suite runs those tests itself);
``make TARGET`` is checked with ``make -n`` to run the command its comment or the doc names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.docs_commands import (
    Command,
    Doc,
    context_variables,
    entry_point_calls,
    optional_words,
    program,
    read_doc,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
DOC_PATHS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS: dict[str, Doc] = {
    str(p.relative_to(ROOT)): read_doc(p, str(p.relative_to(ROOT))) for p in DOC_PATHS
}
COMMANDS = [command for doc in DOCS.values() for command in doc.commands]
#: Sections whose commands run in the quick set (the first hour: ask the model you trained).
QUICK_SECTIONS = {"README.md": ("After the demo",)}
#: Fewer questions and one epoch for every documented training command.
CHEAP_TRAIN = ["trainer.max_epochs=1", "data.train_samples=16", "data.validation_samples=8"]
#: Hydra's config of each entry point.
CONFIG_NAMES = {
    "train": "train",
    "evaluate": "eval",
    "predict": "predict",
    "export": "export",
    "serve": "serve",
}
#: Entry points and tools that serve until stopped: the option giving the port, the path to poll.
SERVERS = {
    "qa_lightning.serve": ("serve.port={}", "/health"),
    "tensorboard": ("--port {}", "/"),
    "mlflow": ("--port {}", "/"),
}
COMMAND_TIMEOUT = 900
#: Copies of the demo train and validation questions standing in for the shared SQuAD split
#: (560 and 90 questions: as many as the benchmarks' --quick sizes take).
SQUAD_COPIES = (8, 3)
#: Options that make a benchmark script cheap, where ``--quick`` does not (its sizes win over the
#: documented ``--epoch``: 200 questions of MiniLM) or does not exist (default: ``--quick``).
SCRIPT_EXTRAS = {
    "train_throughput": ["--samples", "8", "--batch-size", "2", "--warmup", "1", "--steps", "4"],
    "label_fidelity": [],
}
#: The shell variables the docs leave to the reader (a model, exports), in a block's directory.
READER_VARIABLES = {
    "M": "outputs/train/MINILM/hf_model",
    "T": "outputs/train/MINILM/hf_model",
    "S": "outputs/train/RUN/hf_model",
    "FP32": "outputs/export/MINILM/onnx_model",
    "INT8": "outputs/export/MINILM/onnx_int8_model",
}
#: Dummy values of the shell variables the docs leave to the reader, for composing configs.
COMPOSE_VARIABLES = {name: "DIR" for name in (*READER_VARIABLES, "VAL", "SQUAD")}
#: Top-level entries of the repository that a block's directory links to.
REPOSITORY_ENTRIES = (
    *("src", "conf", "tests", "benchmarks", "scripts", "docs"),
    *("Makefile", "pyproject.toml", "README.md"),
)


def kind(command: Command) -> str:
    """What runs the command: make, pytest, curl, server, pip or shell."""
    first = program(command.lines[0], {})
    name = Path(first[0]).name if first else ""
    if name in {"make", "curl", "pip"}:
        return name
    if name == "pytest" or first[1:3] == ["-m", "pytest"]:
        return "pytest"
    if name == "mlflow" or name == "tensorboard" or first[1:3] == ["-m", "qa_lightning.serve"]:
        return "server"
    return "shell"


def is_quick(command: Command) -> bool:
    sections = QUICK_SECTIONS.get(command.doc, ())
    return kind(command) == "make" or command.section.startswith(sections)


def run_params() -> list:
    return [
        pytest.param(c, id=c.id, marks=[] if is_quick(c) else [pytest.mark.slow])
        for c in COMMANDS
        if c.skip is None
    ]


# -- filling the placeholders ----------------------------------------------------------------


def fill(text: str, best_checkpoint: str, directory: Path | None = None) -> str:
    """``text`` with the placeholders the docs use replaced (see the module's docstring)."""
    text = text.replace("outputs/export/DATE/", "outputs/export/RUN/")
    text = re.sub(r"best-[^\s/]*\.ckpt", best_checkpoint, text)
    text = re.sub(
        r"ckpt_path=\.\.\.(?!\S)",
        f"ckpt_path=outputs/train/RUN/checkpoints/{best_checkpoint}",
        text,
    )
    text = re.sub(r"\s\.\.\.(?!\S)", "", text)
    if directory is not None:
        text = re.sub(r"outputs/\S*<date>\S*", lambda m: newest(directory, m.group(0)), text)
    return text


def newest(directory: Path, path: str) -> str:
    """The newest path in ``directory`` matching ``path`` with ``<date>`` as a wildcard."""
    prefix, rest = path.split("<date>", 1)
    matches = [p for p in directory.glob(f"{prefix}*") if (p / rest.lstrip("/")).exists()]
    if not matches:
        raise AssertionError(f"nothing matches {path} in {directory}")
    found = max(matches, key=lambda p: p.stat().st_mtime).relative_to(directory)
    return f"{found}{rest}"


# -- cheaper runs ----------------------------------------------------------------------------


def keys(arguments: list[str]) -> set[str]:
    return {a.split("=", 1)[0].lstrip("+~") for a in arguments if "=" in a}


def entry_point_extras(entry_point: str, arguments: list[str], searchpath: str | None) -> list[str]:
    """The overrides appended to a documented entry point's arguments (module docstring)."""
    given = keys(arguments)
    hydra = searchpath and entry_point in CONFIG_NAMES
    extras = [f"hydra.searchpath=[file://{searchpath}]"] if hydra else []
    if entry_point == "train":
        extras += [] if "model" in given else ["model=tiny"]
        extras += [] if given & {"data", "experiment"} else ["data=demo"]
        extras += CHEAP_TRAIN
        extras += ["tune.num_training=4"] if "tune" in given else []
        extras += ["hydra.sweeper.n_trials=2"] if "hparams_search" in given else []
    elif entry_point == "evaluate":
        extras.append("data.validation_samples=8")
    elif entry_point == "export" and "quantize" in given:
        extras.append("validation_samples=8")
    return extras


def script_extras(words: list[str]) -> list[str]:
    """The options appended to a documented benchmark script's."""
    script = Path(words[1]).stem if len(words) > 1 else ""
    if script == "serve_load":
        cheap = ["--questions", "16", "--log-dir", "serve_load_logs"]
        scenario = words[2] if len(words) > 2 else ""
        if scenario == "load":
            return [*cheap, "--seconds", "1", "--warmup", "0.5"]
        if scenario == "memory":
            return [*cheap, "--requests", "16"]
        if scenario == "killed":
            return [*cheap, "--clients", "4", "--seconds", "8"]
        return [*cheap, "--clients", "4", "--per-client", "4"]
    return SCRIPT_EXTRAS.get(script, ["--quick"])


def cheaper(line: str, variables: dict[str, str], searchpath: str | None) -> str:
    """``line`` with the options that make it cheap appended."""
    if calls := entry_point_calls(line, variables):
        entry_point, arguments = calls[-1]
        extras = entry_point_extras(entry_point, arguments, searchpath)
    elif (words := program(line, variables))[:1] == ["python"] and "benchmarks/" in words[1]:
        extras = script_extras(words)
    else:
        extras = []
    return " ".join([line, *map(quote, extras)])


def quote(word: str) -> str:
    return word if re.fullmatch(r"[\w./:=,+\-\[\]]+", word) else f"'{word}'"


# -- composing each entry point's config -----------------------------------------------------


def entry_points(command: Command) -> list[tuple[str, list[str]]]:
    """(entry point, arguments) of each ``python -m qa_lightning.X`` the command runs that has a
    Hydra config, placeholders filled with dummies and optional ``[key=value]`` words included."""
    variables = context_variables(command, COMPOSE_VARIABLES)
    return [
        call
        for line in command.lines
        for call in entry_point_calls(optional_words(fill(line, "best.ckpt")), variables)
        if call[0] in CONFIG_NAMES
    ]


@pytest.mark.parametrize("command", [pytest.param(c, id=c.id) for c in COMMANDS if entry_points(c)])
def test_command_composes(command: Command, tmp_path: Path) -> None:
    """Every ``python -m qa_lightning.X`` of the command composes its config, marked or not."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    searchpath = write_examples(DOCS[command.doc], tmp_path)
    parser = OverridesParser.create()
    for entry_point, arguments in entry_points(command):
        overrides = [a for a in arguments if a not in {"-m", "--multirun"}]
        assert all(not a.startswith("-") for a in overrides), f"unknown option in {arguments}"
        concrete = [
            f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
            if o.is_sweep_override()
            else o.input_line
            for o in parser.parse_overrides(overrides)
        ]
        if searchpath:
            concrete.append(f"hydra.searchpath=[file://{searchpath}]")
        problem = compose_problem(CONFIG_NAMES[entry_point], concrete)
        if problem:
            pytest.fail(f"{entry_point} {' '.join(concrete)}:\n{problem}", pytrace=False)


def compose_problem(config_name: str, overrides: list[str]) -> str | None:
    """Hydra's error composing ``config_name`` with ``overrides`` (it names the override)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("qa_lightning.conf", version_base="1.3"):
            compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as error:
        return str(error)
    finally:
        GlobalHydra.instance().clear()
    return None


def write_examples(doc: Doc, directory: Path) -> str | None:
    """Write the doc's example files under ``directory`` (``conf/...`` under ``directory/.conf``);
    the config directory to search, if any."""
    searchpath = None
    for example in doc.examples:
        path = Path(example.path)
        if path.parts[0] == "conf":
            searchpath = str(directory / ".conf")
            path = Path(".conf", *path.parts[1:])
        elif path.parts[0] in REPOSITORY_ENTRIES:
            continue  # checked by test_example_files_have_a_place
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(example.content, encoding="utf-8")
    return searchpath


# -- the docs' markers and example files -----------------------------------------------------


@pytest.mark.parametrize("doc", list(DOCS), ids=str)
def test_doc_markers_are_valid(doc: str) -> None:
    """Each ``doc-test`` marker names a known reason, says why, and picks a command."""
    assert not DOCS[doc].problems, "\n".join(DOCS[doc].problems)


def test_example_files_have_a_place() -> None:
    """An example file the docs name inside this repository goes into a directory it has."""
    wrong = [
        f"{e.doc}:L{e.line}: {e.path}"
        for doc in DOCS.values()
        for e in doc.examples
        if Path(e.path).parts[0] in REPOSITORY_ENTRIES and not (ROOT / e.path).parent.is_dir()
    ]
    assert not wrong, (
        "no such directory in the repository (configs are under conf/):\n" + "\n".join(wrong)
    )


def test_every_command_is_collected() -> None:
    """The collector finds the docs' commands: the README's quickstart among them."""
    texts = [c.text for c in COMMANDS if c.doc == "README.md"]
    assert "make demo" in texts
    assert any("qa_lightning.predict" in t and "input=-" in t for t in texts)


# -- the runs the placeholders name ----------------------------------------------------------


@dataclass
class Block:
    """A block's directory and the commands run in it so far."""

    directory: Path
    ran: set[int] = field(default_factory=set)


class DocRuns:
    """The demo data, runs and servers the docs' commands refer to, made on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.blocks: dict[tuple[str, int], Block] = {}
        self.servers: list[subprocess.Popen] = []
        self.made: dict[str, Any] = {}
        self.squad = base / "shared" / "data" / "squad"
        self.data = base / "data"
        self.environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "QA_SQUAD_DIR": str(self.squad),
            "SQUAD": str(self.squad),
            "VAL": str(self.squad / "validation.json"),
        }
        self.environment.pop("HYDRA_FULL_ERROR", None)
        self.write_data()

    def write_data(self) -> None:
        from qa_lightning.core.config import resource_path
        from qa_lightning.data.readers import squad_json
        from tests.data.test_mrqa import squad_to_mrqa

        train, validation = resource_path("demo/train.json"), resource_path("demo/validation.json")
        for directory in (self.squad, self.data):
            directory.mkdir(parents=True)
        replicate(Path(train), SQUAD_COPIES[0], self.squad / "train.json")
        replicate(Path(validation), SQUAD_COPIES[1], self.squad / "validation.json")
        shutil.copy(train, self.data / "train.json")
        shutil.copy(validation, self.data / "dev.json")
        squad_to_mrqa(train, self.data / "NewsQA.jsonl.gz")
        squad_to_mrqa(validation, self.data / "NewsQA-dev.jsonl.gz")
        for source, name in ((train, "train.csv"), (validation, "dev.csv")):
            write_csv(squad_json(Path(source)), self.data / name)
        records = squad_json(Path(validation))[:5]
        lines = [
            {"id": r["id"], "question": r["question"], "context": r["context"]} for r in records
        ]
        (self.data / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    # the tiny run, its exports, a server: made once (a failure too, reported to each user)

    def once(self, name: str, make: Callable[[], T]) -> T:
        if name not in self.made:
            try:
                self.made[name] = make()
            except BaseException as error:
                self.made[name] = error
                raise
        if isinstance(self.made[name], BaseException):
            raise AssertionError(f"making the {name} failed before") from self.made[name]
        return self.made[name]

    @property
    def run(self) -> Path:
        """``outputs/train/<date>`` of the tiny model's demo run, under ``base/tiny``."""
        return self.once("tiny run", lambda: self.train("tiny", "experiment=demo", "model=tiny"))

    @property
    def minilm_run(self) -> Path:
        """The same with the demo model (six layers, for the commands about a MiniLM)."""
        return self.once("MiniLM run", lambda: self.train("minilm", "model=minilm", "data=demo"))

    def train(self, name: str, *overrides: str) -> Path:
        cwd = self.base / name
        cwd.mkdir()
        self.check_call([sys.executable, "-m", "qa_lightning.train", *overrides, *CHEAP_TRAIN], cwd)
        return next(p for p in (cwd / "outputs/train").iterdir() if not p.is_symlink())

    @property
    def best_checkpoint(self) -> str:
        return next((self.run / "checkpoints").glob("best-*.ckpt")).name

    @property
    def exports(self) -> Path:
        """``outputs/export/RUN`` with ``onnx_model`` and ``onnx_int8_model`` of the tiny run."""
        return self.once("tiny exports", lambda: self.export(self.run, "tiny_exports"))

    @property
    def minilm_exports(self) -> Path:
        """The same for the MiniLM run."""
        return self.once("MiniLM exports", lambda: self.export(self.minilm_run, "minilm_exports"))

    def export(self, run: Path, name: str) -> Path:
        """``onnx_model`` and ``onnx_int8_model`` of ``run`` in ``base/name/export``."""
        cwd = self.base / name
        run_dir = cwd / "export"
        export = [sys.executable, "-m", "qa_lightning.export", f"model_dir={run / 'hf_model'}"]
        cwd.mkdir()
        self.check_call([*export, "format=onnx", f"hydra.run.dir={run_dir}"], cwd)
        from qa_lightning.core.config import resource_path

        int8 = ["quantize=int8", "validation_samples=8", f"out_dir={run_dir / 'onnx_int8_model'}"]
        # a bare model directory names no training questions to calibrate on: the demo's
        calibration = [f"quantization.calibration_file={resource_path('demo/train.json')}"]
        self.check_call([*export, *int8, *calibration, f"hydra.run.dir={cwd / 'int8'}"], cwd)
        return run_dir

    @property
    def server_port(self) -> int:
        """The port of ``serve`` answering with the run's ``hf_model``."""
        return self.once("server", self.start_server)

    def start_server(self) -> int:
        port = free_port()
        arguments = [f"model_dir={self.run / 'hf_model'}", f"serve.port={port}"]
        server = subprocess.Popen(
            [sys.executable, "-m", "qa_lightning.serve", *arguments],
            cwd=self.base,
            env=self.environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.servers.append(server)
        assert wait_for(server, f"http://127.0.0.1:{port}/health"), "the server did not start"
        return port

    def check_call(self, arguments: list[str], cwd: Path) -> None:
        result = subprocess.run(
            arguments, cwd=cwd, env=self.environment, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{arguments}:\n{result.stderr[-3000:]}"

    def stop(self) -> None:
        for server in self.servers:
            stop(server)

    # a block's directory

    def block(self, command: Command) -> Block:
        key = (command.doc, command.block_line)
        if key not in self.blocks:
            name = re.sub(r"\W", "_", f"{command.doc}_L{command.block_line}")
            try:
                self.make_directory(self.base / name, command)
            except BaseException:
                shutil.rmtree(self.base / name, ignore_errors=True)
                raise
            self.blocks[key] = Block(self.base / name)
        return self.blocks[key]

    def make_directory(self, directory: Path, command: Command) -> None:
        """A clone-like directory: links to the repository, the demo files, the run (and its
        exports when the block names them) in ``outputs/``, the doc's example files."""
        directory.mkdir()
        for name in REPOSITORY_ENTRIES:
            (directory / name).symlink_to(ROOT / name)
        (directory / ".venv").symlink_to(Path(sys.prefix))
        for path in self.data.iterdir():
            os.link(path, directory / path.name)
        block_text = " ".join(
            c.text for c in COMMANDS if (c.doc, c.block_line) == (command.doc, command.block_line)
        )
        if re.search(r"outputs/train/|\$(RUN|S)\b|ckpt_path=\.\.\.", block_text):
            copy_run(self.run, directory / "outputs/train", "RUN", "TEACHER")
        if re.search(r"\$(M|T)\b", block_text):
            copy_run(self.minilm_run, directory / "outputs/train", "MINILM")
        if re.search(r"outputs/export/(RUN|DATE)", block_text):
            shutil.copytree(self.exports, directory / "outputs/export/RUN")
        if re.search(r"\$(FP32|INT8)\b", block_text):
            shutil.copytree(self.minilm_exports, directory / "outputs/export/MINILM")
        write_examples(DOCS[command.doc], directory)

    # running a command

    def script(self, command: Command, block: Block, cheap: bool = True) -> str:
        """The bash script of the command: its context lines, then its lines, filled."""
        variables = context_variables(command, self.environment_in(block.directory))
        conf = block.directory / ".conf"
        searchpath = str(conf) if conf.is_dir() else None
        needs_run = re.search(r"best-|ckpt_path=\.\.\.", command.text)
        best = self.best_checkpoint if needs_run else "best.ckpt"
        lines = [fill(line, best, block.directory) for line in command.lines]
        if cheap:
            lines = [cheaper(line, variables, searchpath) for line in lines]
        return "\n".join(["set -eo pipefail", *command.context, *lines])

    def environment_in(self, cwd: Path) -> dict[str, str]:
        """The environment of the commands run in ``cwd``: the reader's variables set to the
        runs' paths there."""
        return {**self.environment, **{k: str(cwd / v) for k, v in READER_VARIABLES.items()}}

    def shell(self, script: str, cwd: Path) -> subprocess.CompletedProcess:
        with subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=self.environment_in(cwd),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process:
            try:
                out, err = process.communicate(timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
        return subprocess.CompletedProcess(script, process.returncode, out, err)

    def run_earlier(self, command: Command, block: Block) -> None:
        """The block's earlier commands not yet run (their own tests report failures)."""
        for earlier in COMMANDS:
            same_block = (earlier.doc, earlier.block_line) == (command.doc, command.block_line)
            if same_block and earlier.line < command.line and earlier.line not in block.ran:
                block.ran.add(earlier.line)
                if earlier.skip is None and kind(earlier) == "shell":
                    self.shell(self.script(earlier, block), block.directory)


def copy_run(run: Path, runs: Path, *names: str) -> None:
    """``run`` (hard links to its files) and the links beside it into ``runs``, linked to as
    each of ``names``."""
    runs.mkdir(parents=True, exist_ok=True)
    for entry in run.parent.iterdir():
        if (runs / entry.name).exists():
            continue
        if entry.is_symlink():
            (runs / entry.name).symlink_to(os.readlink(entry))
        else:
            shutil.copytree(entry, runs / entry.name, copy_function=os.link)
    for name in names:
        (runs / name).symlink_to(run.name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(process: subprocess.Popen, url: str, seconds: float = 240) -> bool:
    """Whether ``url`` answers 200 before ``process`` ends or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(1)
    return False


def stop(process: subprocess.Popen) -> int | None:
    """SIGTERM to the process group, SIGKILL after 30 s; the exit status."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def replicate(source: Path, copies: int, target: Path) -> None:
    """``copies`` copies of a SQuAD json file's articles, question ids made distinct."""
    content = json.loads(source.read_text(encoding="utf-8"))
    articles = [
        {**article, "paragraphs": [copied(p, copy) for p in article["paragraphs"]]}
        for copy in range(copies)
        for article in content["data"]
    ]
    target.write_text(json.dumps({**content, "data": articles}), encoding="utf-8")


def copied(paragraph: dict, copy: int) -> dict:
    return {**paragraph, "qas": [{**qa, "id": f"{qa['id']}-{copy}"} for qa in paragraph["qas"]]}


def write_csv(records: list[dict], path: Path) -> None:
    """Records as the CSV of docs/extending.md's example reader: one answer a row."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "context", "question", "answer", "answer_start"])
        for r in records:
            answers = r["answers"]
            first = (
                (answers["text"][0], answers["answer_start"][0])
                if isinstance(answers, dict)
                else (answers[0]["text"], answers[0]["answer_start"])
            )
            writer.writerow([r["id"], r["context"], r["question"], *first])


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory: pytest.TempPathFactory):
    runs = DocRuns(tmp_path_factory.mktemp("docs"))
    yield runs
    runs.stop()


# -- running each command --------------------------------------------------------------------


@pytest.mark.parametrize("command", run_params())
def test_command_runs(command: Command, doc_runs: DocRuns) -> None:
    """The documented command runs (exit 0) on the demo data (see the module's docstring)."""
    how = kind(command)
    assert how != "pip", "mark it: <!-- doc-test: skip (install: why) -->"
    if how == "make":
        check_make(command)
        return
    block = doc_runs.block(command)
    doc_runs.run_earlier(command, block)
    block.ran.add(command.line)
    if how == "server":
        check_server(command, block, doc_runs)
        return
    script = doc_runs.script(command, block, cheap=how == "shell")
    if how == "pytest":
        script += " --collect-only -q"
    if how == "curl":
        script = script.replace("127.0.0.1:8000", f"127.0.0.1:{doc_runs.server_port}")
    result = doc_runs.shell(script, block.directory)
    report = f"$ {script}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.returncode == 0, report
    if how == "pytest":
        assert re.search(r"^\d+(/\d+)? tests? collected", result.stdout, re.M), report
    if how == "curl":
        assert json.loads(result.stdout)["answers"], report


def check_make(command: Command) -> None:
    """``make -n TARGET`` succeeds and runs the command that the comment or the doc names."""
    target = command.lines[0].split()[1]
    result = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    recipe = re.sub(r"\S*/bin/python3?\b", "python", result.stdout)
    said = re.findall(rf"`make {target}` runs `([^`]+)`", (ROOT / command.doc).read_text())
    said += re.findall(r"^(python [^:]*?)(?::|$)", command.comment)
    for expected in said:
        assert expected.strip() in recipe, f"make -n {target}:\n{recipe}\nlacks: {expected}"


def check_server(command: Command, block: Block, doc_runs: DocRuns) -> None:
    """The server starts and answers, then stops on SIGTERM."""
    words = program(command.lines[0], {})
    name = "qa_lightning.serve" if words[1:3] == ["-m", "qa_lightning.serve"] else words[0]
    option, path = SERVERS[Path(name).name]
    port = free_port()
    script = f"{doc_runs.script(command, block)} {option.format(port)}"
    log = block.directory / f"server-L{command.line}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=block.directory,
            env=doc_runs.environment_in(block.directory),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        doc_runs.servers.append(process)
        answered = wait_for(process, f"http://127.0.0.1:{port}{path}")
        stop(process)
    assert answered, f"$ {script}\n{log.read_text()[-3000:]}"


# -- the collector itself --------------------------------------------------------------------

SAMPLE_DOC = """# Title
<!-- doc-test: skip "data=sample" (hub: downloads SQuAD) -->
```bash
RUN=$(ls -d outputs/train/2*/ | tail -n 1)   # the latest run
python -m qa_lightning.train data=sample   # from the hub
python -m qa_lightning.predict model_dir=$RUN/hf_model \\
  question='"Who? # not a comment"'
```
<!-- doc-test: skip (wifi: not a reason of ours) -->
```bash
make demo
```
<!-- doc-test: skip "data=full" (gpu: picks nothing) -->
```bash
for SEED in 1 2; do
  python -m qa_lightning.train seed=$SEED
done
```
"""


def test_collector_reads_commands_context_and_markers(tmp_path: Path) -> None:
    path = tmp_path / "sample.md"
    path.write_text(SAMPLE_DOC)
    doc = read_doc(path, "sample.md")
    assert [(c.id, c.skip and c.skip.reason) for c in doc.commands] == [
        ("sample.md:L5", "hub"),
        ("sample.md:L6", None),
        ("sample.md:L11", None),
        ("sample.md:L15", None),
    ]
    predict = doc.commands[1]
    assert predict.text == (
        "python -m qa_lightning.predict model_dir=$RUN/hf_model question='\"Who? # not a comment\"'"
    )
    assert predict.context == ("RUN=$(ls -d outputs/train/2*/ | tail -n 1)",)
    assert doc.commands[3].lines[1:] == ("python -m qa_lightning.train seed=$SEED", "done")
    assert doc.problems == [
        "sample.md:L9: unknown reason 'wifi'; one of ['cluster', 'gpu', 'hub', 'install', 'long']",
        "sample.md:L13: the marker's words 'data=full' are in no command of the block below it",
    ]


def test_placeholders_and_cheaper_runs_keep_the_documented_words() -> None:
    line = "python -m qa_lightning.export ckpt_path=... format=onnx quantize=int8 ..."
    assert fill(line, "best-epoch00-f1.00.ckpt") == (
        "python -m qa_lightning.export ckpt_path=outputs/train/RUN/checkpoints/"
        "best-epoch00-f1.00.ckpt format=onnx quantize=int8"
    )
    train = "python -m qa_lightning.train model=minilm trainer.max_epochs=2 tune=lr_find"
    assert cheaper(train, {}, None) == " ".join(
        [train, "data=demo", *CHEAP_TRAIN, "tune.num_training=4"]
    )
    assert cheaper("python benchmarks/memory.py", {}, None) == "python benchmarks/memory.py --quick"
