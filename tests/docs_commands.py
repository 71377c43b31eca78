"""The shell commands of README.md and docs/*.md, read from their fenced blocks, for
tests/test_docs.py.

Each ``bash`` (``sh``, ``shell``, ``console``) block is read as a script: comment lines are
skipped, ``\\`` continuations joined and a ``for ... done`` loop kept whole; a line that only sets
a variable (``RUN=$(...)``, ``DATA="..."``) or activates the virtualenv is context, run before
each later command of its block. Every other line is a command, its test id
``<doc>:L<line of its first line>``.

A command that cannot run here is marked in the doc, by an HTML comment (invisible when
rendered) on the lines right above its block::

    <!-- doc-test: skip "data=sample" (hub: downloads SQuAD from the Hugging Face hub) -->

The quoted words pick the block's commands holding them as whole words (none: the whole block);
the reason is one of :data:`REASONS`, followed by a colon and why.

A ``python`` or ``yaml`` block whose first line is a comment naming a file
(``# mypackage/readers.py``) is an example file: the commands of its doc run with it in place
(``conf/...`` files through ``hydra.searchpath``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

#: Why a documented command may stay out of the test run; a marker names one of these.
REASONS = {
    "hub": "downloads models or data from the Hugging Face hub",
    "gpu": "needs a CUDA GPU",
    "cluster": "needs several GPUs or machines (torchrun, SLURM)",
    "install": "changes the Python environment (make wheel-check installs the wheel)",
    "long": "full-size work, hours on a CPU, with no smaller setting",
}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
HEADING = re.compile(r"^#{1,6}\s+(.*)")
MARKER = re.compile(r"^\s*<!--\s*doc-test:(.*?)-->\s*$")
MARKER_BODY = re.compile(r'^\s*skip(?:\s+"([^"]+)")?\s+\((\w+):\s*([^)]*\S)\s*\)\s*$')
ASSIGNMENT = re.compile(r"""^[A-Za-z_]\w*=("[^"]*"|'[^']*'|\$\(.*\)|[^\s;|&<>]*)$""")
EXAMPLE_FILE = re.compile(r"^#\s+([\w./-]+\.(?:py|ya?ml|json|jsonl|csv))(?::|\s|$)")
LOOP_START = re.compile(r"^(for|while|until)\b")
LOOP_END = re.compile(r"^done\b")
#: Where a ``python -m`` entry point of the package starts in a command's words.
ENTRY_POINT = re.compile(r"^qa_lightning\.(\w+)$")
#: The shell's control operators, which end a simple command.
CONTROL = {"|", "||", "&", "&&", ";", "<", ">", ">>", "(", ")"}


@dataclass(frozen=True)
class Marker:
    """A ``doc-test: skip`` comment: the commands it picks (all when ``words`` is None), why."""

    line: int
    words: str | None
    reason: str
    why: str

    def picks(self, text: str) -> bool:
        return self.words is None or bool(re.search(rf"(?<!\S){re.escape(self.words)}(?!\S)", text))


@dataclass(frozen=True)
class Command:
    """One documented command: its lines (continuations joined, comments removed), the context
    lines of its block before it, the comment after it and the marker that skips it, if any."""

    doc: str
    line: int
    section: str
    block_line: int
    lines: tuple[str, ...]
    context: tuple[str, ...]
    comment: str
    skip: Marker | None = None

    @property
    def id(self) -> str:
        return f"{self.doc}:L{self.line}"

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class ExampleFile:
    """A code block that the doc presents as a file: its path and content."""

    doc: str
    line: int
    path: str
    content: str


@dataclass
class Doc:
    """The commands, example files and marker problems of one markdown file."""

    name: str
    commands: list[Command] = field(default_factory=list)
    examples: list[ExampleFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def strip_comment(line: str) -> tuple[str, str]:
    """``line`` without its shell comment (a ``#`` starting a word, outside quotes), and the
    comment's text."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def logical_lines(body: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """(first line number, text, comment) of each line of a block, continuations joined,
    comment lines and blank lines dropped."""
    lines: list[tuple[int, str, str]] = []
    pending: tuple[int, str] | None = None
    for number, raw in body:
        text, comment = strip_comment(raw)
        if not text.strip() and pending is None:
            continue
        start, before = pending or (number, "")
        joined = f"{before} {text.strip()}".strip()
        if text.endswith("\\"):
            pending = (start, joined[:-1].rstrip())
            continue
        pending = None
        lines.append((start, joined, comment))
    if pending:
        lines.append((pending[0], pending[1], ""))
    return lines


def is_context(text: str) -> bool:
    """A line that only sets a shell variable or activates a virtualenv."""
    return bool(ASSIGNMENT.match(text)) or text.split()[0] in {".", "source"}


def block_commands(
    doc: str, section: str, fence_line: int, body: list[tuple[int, str]], markers: list[Marker]
) -> tuple[list[Command], list[str]]:
    """The commands of one shell block, each with its context and marker; marker problems."""
    commands, context, loop, problems = [], [], [], []
    for start, text, comment in logical_lines(body):
        if loop or LOOP_START.match(text):
            loop.append((start, text))
            if not LOOP_END.match(text):
                continue
            start, lines, loop = loop[0][0], tuple(t for _, t in loop), []
        elif is_context(text):
            context.append(text)
            continue
        else:
            lines = (text,)
        joined = "\n".join(lines)
        marker = next((m for m in markers if m.picks(joined)), None)
        commands.append(
            Command(doc, start, section, fence_line, lines, tuple(context), comment, marker)
        )
    for marker in markers:
        if not any(c.skip == marker for c in commands):
            problems.append(
                f"{doc}:L{marker.line}: the marker's words {marker.words!r} are in no command of "
                "the block below it"
            )
    return commands, problems


def parse_marker(doc: str, number: int, body: str) -> tuple[Marker | None, str | None]:
    """The marker of a ``doc-test:`` comment, or the problem with it."""
    match = MARKER_BODY.match(body)
    if not match:
        return None, (
            f'{doc}:L{number}: write the marker as <!-- doc-test: skip ["words"] (reason: why) '
            f"--> with a reason of {sorted(REASONS)}"
        )
    words, reason, why = match.groups()
    if reason not in REASONS:
        return None, f"{doc}:L{number}: unknown reason {reason!r}; one of {sorted(REASONS)}"
    return Marker(number, words, reason, why), None


def read_doc(path: Path, name: str) -> Doc:
    """The commands, example files and marker problems of the markdown file ``path``."""
    doc = Doc(name)
    section, markers, fence = "", [], None
    body: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if fence is not None:
            if FENCE.match(line) and not FENCE.match(line).group(1):
                finish_block(doc, section, fence, body, markers)
                fence, body, markers = None, [], []
            else:
                body.append((number, line))
            continue
        if match := FENCE.match(line):
            fence = (number, match.group(1).lower())
            continue
        if match := MARKER.match(line):
            marker, problem = parse_marker(name, number, match.group(1))
            doc.problems.extend([problem] if problem else [])
            markers.extend([marker] if marker else [])
            continue
        if markers:
            doc.problems.append(
                f"{name}:L{markers[0].line}: a doc-test marker must stand right above a fenced "
                "shell block"
            )
            markers = []
        if match := HEADING.match(line):
            section = match.group(1).strip()
    return doc


def finish_block(
    doc: Doc,
    section: str,
    fence: tuple[int, str],
    body: list[tuple[int, str]],
    markers: list[Marker],
) -> None:
    """Add a finished fenced block's commands, or its example file, to ``doc``."""
    line, language = fence
    if language in SHELL_LANGUAGES:
        commands, problems = block_commands(doc.name, section, line, body, markers)
        doc.commands.extend(commands)
        doc.problems.extend(problems)
        return
    if markers:
        doc.problems.append(f"{doc.name}:L{markers[0].line}: a marker above a {language} block")
    if body and (match := EXAMPLE_FILE.match(body[0][1].strip())):
        content = "\n".join(text for _, text in body[1:]) + "\n"
        doc.examples.append(ExampleFile(doc.name, line, match.group(1), content))


# -- the words of a command -------------------------------------------------------------------


def expand(text: str, variables: dict[str, str]) -> str:
    """``text`` with ``$NAME`` and ``${NAME}`` replaced from ``variables`` (others left)."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$(?:\{(\w+)\}|([A-Za-z_]\w*))", value, text)


def context_variables(command: Command, environment: dict[str, str]) -> dict[str, str]:
    """The variables the command's context lines set (a command substitution becomes ``X``),
    over ``environment``."""
    variables = dict(environment)
    for line in command.context:
        if match := ASSIGNMENT.match(line):
            name, raw = line.split("=", 1)[0], match.group(1)
            if raw.startswith("$("):
                variables[name] = "X"
            else:
                variables[name] = (shlex.split(expand(raw, variables)) or [""])[0]
    return variables


def words(line: str) -> list[str]:
    """The shell words of ``line``, control operators as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def entry_point_calls(line: str, variables: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(entry point, arguments) of each ``python -m qa_lightning.<entry point>`` in ``line``,
    after expanding ``variables``."""
    tokens = words(expand(line, variables))
    calls = []
    for i, token in enumerate(tokens[:-2]):
        match = ENTRY_POINT.match(tokens[i + 2])
        if Path(token).name in {"python", "python3"} and tokens[i + 1] == "-m" and match:
            arguments = []
            for argument in tokens[i + 3 :]:
                if argument in CONTROL:
                    break
                arguments.append(argument)
            calls.append((match.group(1), arguments))
    return calls


def program(line: str, variables: dict[str, str]) -> list[str]:
    """The words of ``line`` from its program on (leading ``NAME=value`` words dropped)."""
    tokens = words(expand(line, variables))
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
        tokens.pop(0)
    return tokens


def optional_words(line: str) -> str:
    """``line`` with the optional words the docs put in brackets (``[key=value]``) included."""
    return re.sub(r"(?<!\S)\[([^\[\]\s]+=[^\[\]\s]*)\](?!\S)", r"\1", line)
