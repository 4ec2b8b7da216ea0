"""The READMEs, checked line by line: their ```bash and ```python blocks run as shown, and say what they print.

README.md and then rank_tables/README.md. The blocks run in order in one scratch directory, as a new user types them in the checkout after
``source .venv/bin/activate``. The scratch directory links to the checkout's top-level entries (``examples/``,
``rank_tables/``, ``launchers/``, ``benchmarks/``, ...; ``.venv`` to this interpreter's environment), so
relative paths work as in the checkout while every file a block writes lands in the scratch directory; a last
test checks that nothing in the checkout was written through the links.

What each block is:

- ```bash (or ```sh): one bash script (``set -e -o pipefail``), with the venv's bin first on PATH and the
  project importable. A line that is a bare ``wait`` waits for every background job and fails when one failed.
- ```python: written to a file in the scratch directory (a file, so that ``spawn`` workers can import it
  again) and run with the venv's python.
- ``` without a language: output, never run. Right after a bash/python block (nothing but blank lines between)
  it is that block's expected output; ``<!-- readme-test: output -->`` before it says the same when prose
  stands between them.
- ```ini / ```json: never run; parsed (configparser, with the project's inline ``;`` comments / json), and an
  ini may only use sections and keys that ranks/_config_file.py knows.
- any other language (```text, ...): illustration only.

Expected output is checked against stdout and stderr together:

- an output block: each of its lines matches one whole line of the output (leading and trailing blanks
  ignored, in any order, since ranks interleave); a line that is only ``...`` stands for lines left out;
- ``# -> TEXT`` at the end of a line, or alone on a line, in a bash or python block: TEXT occurs in a line
  of that block's output.

In expected text ``...`` matches anything, a ``<word>`` placeholder (``<pid>``, ``<host>``) any non-empty
text, a floating-point number any floating-point number (values move with the platform) and a timestamp
(``2026-11-22 00:25:43.585 UTC``) any timestamp. Everything else is literal.

Markers, an HTML comment on a line of its own right before a block (blank lines and other markers between
are fine):

- ``<!-- readme-test: skip (REASON) -->``: the block cannot run here; the reason is required;
- ``<!-- readme-test: file NAME -->``: the block's text is also written to NAME in the scratch directory,
  for a file the README shows and a later command reads (``comm.ini``);
- ``<!-- readme-test: output -->``: see above;
- ``<!-- readme-test: timeout SECONDS -->``: the block's time limit (default 60 s).

The only substitutions: the documented default base port 29500 is replaced by a free port in every block
and file, and the environment sets ``ORCH_BASE_PORT`` to that port as well; as root, Open MPI's
``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1`` stand for the ``--allow-run-as-root`` the README mentions.

Selecting one block (``-k L123``) first runs every block before it, which it may depend on.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ranks import free_base_port
from ranks._config_file import KNOWN_SECTIONS, MINDSPORE_LITE_ONLY_KEYS, MINDSPORE_LITE_ONLY_SECTIONS

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "rank_tables/README.md")  # run in this order, each from the checkout's root

pytestmark = pytest.mark.cli

RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
DEFAULT_TIMEOUT = 60.0
DOCUMENTED_PORT = "29500"
MAX_SKIPPED = 6  # blocks that cannot run here stay few, each with its reason

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->\s*$")
_ARROW = re.compile(r"(?:^|\s)# -> (?P<text>.+?)\s*$")


@dataclass
class Block:
    source: str  # the README's path in the checkout
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    section: str
    markers: dict[str, str] = field(default_factory=dict)
    follows_run_block: bool = False  # only blank lines between it and the block before, which is bash/python
    expected: list[str] = field(default_factory=list)  # lines of the output block that belongs to it

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGUAGES and "skip" not in self.markers

    @property
    def at(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        prefix = "" if self.source == READMES[0] else self.source.split("/")[0] + "-"
        return f"{prefix}L{self.line}-{self.lang or 'output'}-{slug}"

    def arrows(self) -> list[str]:
        """The ``# -> TEXT`` expectations of a bash or python block."""
        return [m.group("text") for m in map(_ARROW.search, self.text.splitlines()) if m]


def parse_readme(text: str, source: str = "README.md") -> list[Block]:
    """Every fenced block of a README with its markers, its section, and expected output attached."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = "top"
    markers: dict[str, str] = {}
    since_block: list[str] = []  # non-blank lines since the last block closed
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            marker = _MARKER.match(line)
            if marker:
                kind, arg = marker.group("kind"), marker.group("arg")
                if kind not in ("skip", "file", "output", "timeout"):
                    raise ValueError(f"{source}:{i + 1}: unknown readme-test marker {kind!r}")
                markers[kind] = arg
            elif line.lstrip().startswith("<!--") and "readme-test" in line:
                raise ValueError(f"{source}:{i + 1}: malformed readme-test marker: {line.strip()}")
            elif line.strip():
                if markers:
                    raise ValueError(f"{source}:{i + 1}: a readme-test marker must come right before its block")
                since_block.append(line)
            i += 1
            continue
        indent, lang = fence.group("indent"), fence.group("lang")
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{source}:{len(blocks) and blocks[-1].line}: a fenced block is never closed")
        previous = blocks[-1] if blocks else None
        block = Block(source=source, line=i - len(body), lang=lang, text="\n".join(body) + "\n", section=section, markers=markers,
                      follows_run_block=bool(previous and previous.lang in RUN_LANGUAGES and not since_block))
        if lang == "" and (block.follows_run_block or "output" in markers):
            owner = next((b for b in reversed(blocks) if b.lang in RUN_LANGUAGES), None)
            if owner is None:
                raise ValueError(f"{block.at}: an output block with no bash/python block before it")
            owner.expected.extend(body)
        blocks.append(block)
        markers, since_block = {}, []
        i += 1
    return blocks


BLOCKS = [block for source in READMES for block in parse_readme((ROOT / source).read_text(), source)]
RUNNABLE = [b for b in BLOCKS if b.runs]


# --- expected text -> regular expressions ------------------------------------------------------

_TOKENS = re.compile(
    r"(?P<timestamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? [A-Z]{2,5})"
    r"|(?P<dots>\s*\.\.\.)"
    r"|(?P<placeholder><[a-z]+>)"
    r"|(?P<float>(?<![\w.])[-+]?(?:\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?![\w.]))"
    r"|(?P<space>\s+)"
)
_ANY_FLOAT = r"[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|nan|inf)"


def expectation(text: str) -> re.Pattern:
    """The regular expression for one line of expected text (see the module docstring)."""
    parts, pos = [], 0
    for m in _TOKENS.finditer(text):
        parts.append(re.escape(text[pos:m.start()]))
        kind = m.lastgroup
        parts.append({
            "timestamp": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+",
            "dots": r".*?",
            "placeholder": r".+?",
            "float": _ANY_FLOAT,
            "space": r"\s+",
        }[kind])
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    return re.compile("".join(parts))


def missing_output_lines(expected: list[str], output: str) -> list[str]:
    lines = [line.strip() for line in output.splitlines()]
    missing = []
    for want in expected:
        want = want.strip()
        if not want or want == "...":
            continue
        pattern = expectation(want)
        if not any(pattern.fullmatch(line) for line in lines):
            missing.append(want)
    return missing


def missing_arrows(arrows: list[str], output: str) -> list[str]:
    lines = output.splitlines()
    return [a for a in arrows if not any(expectation(a).search(line) for line in lines)]


# --- running ------------------------------------------------------------------------------------

_WAIT_ALL = 'for _readme_job in $(jobs -p); do wait "$_readme_job" || exit $?; done'


def bash_script(text: str) -> str:
    lines = [_WAIT_ALL if re.fullmatch(r"\s*wait\s*(#.*)?", line) else line for line in text.splitlines()]
    return "set -e -o pipefail\n" + "\n".join(lines) + "\n"


class Scratch:
    """The scratch directory and the runs done in it so far."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, str | None] = {}  # block.at -> None (passed) or the failure
        venv = Path(sys.prefix)
        self.bin = Path(sys.executable).parent
        for entry in ROOT.iterdir():
            if entry.name not in (".git", ".venv") and not entry.name.startswith((".pytest", "__")):
                (path / entry.name).symlink_to(entry)
        (path / ".venv").symlink_to(venv)

    def environment(self, port: int) -> dict[str, str]:
        drop = ("OMPI_", "PMI_", "PMIX_", "PRTE_", "ORCH_")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(drop) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_TABLE_FILE")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = sys.prefix
        env["PYTHONPATH"] = str(ROOT)
        env["ORCH_BASE_PORT"] = str(port)
        if os.geteuid() == 0:
            env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        return env

    def run(self, block: Block) -> None:
        """Run ``block`` (raises AssertionError on a failure, with its output)."""
        port = free_base_port(4)
        text = block.text.replace(DOCUMENTED_PORT, str(port))
        if block.lang == "python":
            script = self.path / f"readme_block_{BLOCKS.index(block)}.py"
            script.write_text(text)
            command = [sys.executable, script.name]
        else:
            command = ["bash", "-c", bash_script(text)]
        timeout = float(block.markers.get("timeout") or DEFAULT_TIMEOUT)
        process = subprocess.Popen(command, cwd=self.path, env=self.environment(port), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise AssertionError(f"{block.at}: did not finish within {timeout:.0f} s; output:\n{output}")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # background jobs the block left running
            except ProcessLookupError:
                pass
        self.last_output = output
        where = f"{block.at} ({block.lang} block in {block.section!r})"
        if process.returncode != 0:
            raise AssertionError(f"{where} exited with {process.returncode}; output:\n{output}")
        missing = missing_output_lines(block.expected, output) + missing_arrows(block.arrows(), output)
        if missing:
            raise AssertionError(f"{where}: expected output not found:\n  " + "\n  ".join(missing) +
                                 f"\noutput:\n{output}")

    def run_through(self, block: Block) -> None:
        """Run every runnable block before ``block`` that has not run yet, then ``block``."""
        for earlier in RUNNABLE[:RUNNABLE.index(block) + 1]:
            if earlier.at not in self.done:
                self.done[earlier.at] = self._attempt(earlier)
        failure = self.done[block.at]
        if failure:
            raise AssertionError(failure)

    def _attempt(self, block: Block) -> str | None:
        for earlier in BLOCKS[:BLOCKS.index(block)]:
            if "file" in earlier.markers:  # files the README shows are in place before the commands after them
                target = self.path / earlier.markers["file"]
                if not target.exists():
                    target.write_text(earlier.text.replace(DOCUMENTED_PORT, str(free_base_port(4))))
        try:
            self.run(block)
        except AssertionError as exc:
            return str(exc)
        return None


def _checkout_files() -> dict[str, tuple[int, int]]:
    skip_dirs = {".git", ".venv", "__pycache__", ".pytest_cache"}
    files = {}
    for directory, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in names:
            path = Path(directory, name)
            if path.suffix != ".pyc":
                stat = path.stat()
                files[str(path.relative_to(ROOT))] = (stat.st_mtime_ns, stat.st_size)
    return files


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's blocks run in the project's virtual environment; run pytest with .venv/bin/python")
    before = _checkout_files()
    yield Scratch(tmp_path_factory.mktemp("readme"))
    after = _checkout_files()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"README blocks wrote into the checkout: {changed}"


@pytest.mark.timeout(900)  # each block has its own limit; this one also covers the blocks run before it
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_readme_block_runs_as_shown(block, scratch):
    scratch.run_through(block)


# --- the blocks that are not run ---------------------------------------------------------------

def _ini_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    parser.read_string(text)
    return parser


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("ini", "json")], ids=lambda b: b.name)
def test_readme_ini_and_json_blocks_parse(block):
    """An ini block parses and uses only sections and keys ranks/_config_file.py knows; a json block parses."""
    if block.lang == "json":
        json.loads(block.text)
        return
    parser = _ini_sections(block.text)
    assert parser.sections(), f"{block.at}: an ini block without sections"
    for section in parser.sections():
        if section in MINDSPORE_LITE_ONLY_SECTIONS:
            continue
        assert section in KNOWN_SECTIONS, f"{block.at}: unknown section [{section}]"
        known = KNOWN_SECTIONS[section] + MINDSPORE_LITE_ONLY_KEYS.get(section, ())
        for key in parser[section]:
            assert key in known, f"{block.at}: [{section}] {key} is not a key ranks/_config_file.py knows"


def test_skipped_blocks_are_few_and_say_why():
    skipped = [b for b in BLOCKS if "skip" in b.markers]
    for block in skipped:
        assert re.fullmatch(r"\(.{10,}\)", block.markers["skip"]), (
            f"{block.at}: write the reason: <!-- readme-test: skip (why it cannot run here) -->")
        assert block.lang in RUN_LANGUAGES, f"{block.at}: only bash/python blocks are run, or skipped"
    assert len(skipped) <= MAX_SKIPPED, [b.at for b in skipped]


def test_every_block_has_a_known_language():
    known = set(RUN_LANGUAGES) | {"", "ini", "json", "text"}
    assert not [(b.at, b.lang) for b in BLOCKS if b.lang not in known]


_TOP_DIRS = r"(?:\.ci|benchmarks|docs|examples|launchers|orchestrator|rank_tables|ranks|tests)"
_REPO_PATH = re.compile(rf"(?<![\w./-]){_TOP_DIRS}/[\w./-]*[\w]")
_SOURCES = ("README.md", "rank_tables/README.md", ".ci/run", "ranks/*.py", "launchers/*.py", "launchers/*.sh",
            "orchestrator/*.py", "examples/*.py", "benchmarks/*.py", "tests/*.py", "tests/*/*.py")


def test_files_the_readme_and_the_code_name_exist():
    """Every checkout path named in the README or in a docstring or comment (`examples/demo.py`,
    `ranks/_env.py`, `docs/...`) exists; globs (`tests/test_*.py`) are not checked."""
    missing = set()
    for pattern in _SOURCES:
        for source in ROOT.glob(pattern):
            text = source.read_text()
            for match in _REPO_PATH.finditer(text):
                name = match.group(0)
                following = text[match.end():match.end() + 1]
                if following not in ("*", "{", "<") and not (ROOT / name).exists():
                    missing.add(f"{source.relative_to(ROOT)}: {name}")
    assert not missing, "these name files that do not exist:\n" + "\n".join(sorted(missing))


def test_expectations_match_what_they_should():
    """The matching rules themselves (see the module docstring)."""
    assert expectation("rank 0 of 2 (pid <pid>) at 2026-11-22 00:25:43.585 UTC").fullmatch(
        "rank 0 of 2 (pid 4711) at 2031-01-02 03:04:05.006 CET")
    assert not expectation("rank 0 of 2").fullmatch("rank 1 of 2")
    assert expectation("difference 1.55e-06 (tolerance 0.0001): ok").fullmatch("difference 2.2e-07 (tolerance 0.0001): ok")
    assert expectation("at <time> ...; last line").fullmatch("at 12:00; last line")
    assert expectation("allreduce -> [3.0, 3.0]").search("rank 1: allreduce -> [3.0, 3.0] OK")
    assert expectation('File ".../allreduce.py", line <n>, in main').fullmatch('File "/x/examples/allreduce.py", line 40, in main')
    assert not expectation("exit code 2").fullmatch("exit code 1")
    assert missing_output_lines(["a", "...", "  b 1.5"], "b 2.5\na\n") == []
    assert bash_script("x &\nwait   # for rank 0\n").splitlines()[2] == _WAIT_ALL
