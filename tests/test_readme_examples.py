"""Every fenced ``python``, ``bash`` and ``sh`` block of README.md runs as written.

Each block runs in a fresh temporary folder with a timeout: a Python block in a subprocess
with ``PYTHONPATH`` set to this checkout's ``src``, a shell block under ``bash -e`` with the
test interpreter's ``bin`` folder first on ``PATH`` (so ``softgrad`` and ``torchrun`` are the
ones of the environment running the tests, importing this checkout). A block made only of
``make`` commands is not run: those are what CI runs.

An HTML comment on the line just before a block changes how it runs (the README's
"Testing the README" section documents the same convention):

* ``<!-- skip-test: REASON -->``: skipped with REASON;
* ``<!-- needs: gpu -->``: run only where ``torch.cuda.is_available()``;
* ``<!-- test-with: torchrun ARGS -->``: the Python block is written to a file and run as
  ``torchrun ARGS FILE``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TIMEOUT_S = 60
_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*(skip-test|needs|test-with)\s*:\s*(.*?)\s*-->\s*$")
# optional dependencies a block may import: without them the block is skipped, not failed
_OPTIONAL = re.compile(r"^\s*(?:from|import)\s+(torch|transformers|sklearn|scipy|matplotlib)\b", re.MULTILINE)
_LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    kind: str  # "python" or "shell"
    code: str
    directive: tuple[str, str] | None  # ("skip-test", reason), ("needs", "gpu"), ("test-with", "torchrun ...")

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.kind}"


def extract_blocks(text: str) -> list[Block]:
    """The runnable fenced blocks of a Markdown text, with the directive on the line before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md:{start + 1}: a ``` fence is never closed")
        previous = lines[start - 1] if start > 0 else ""
        d = _DIRECTIVE.match(previous)
        if lang in _LANGUAGES:
            blocks.append(Block(start + 1, _LANGUAGES[lang], "\n".join(lines[start + 1:j]) + "\n",
                                (d.group(1), d.group(2)) if d else None))
        i = j + 1
    return blocks


def _only_make(code: str) -> bool:
    commands = [ln.split("#", 1)[0].strip() for ln in code.splitlines()]
    commands = [c for c in commands if c]
    return bool(commands) and all(c.split()[0] == "make" for c in commands)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    env.pop("SOFTGRAD_BACKEND", None)
    return env


BLOCKS = extract_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_blocks_of_every_kind():
    """The extractor sees the README's blocks (a broken fence regex would make every test vanish)."""
    kinds = {b.kind for b in BLOCKS}
    assert kinds == {"python", "shell"}
    assert sum(b.directive is None for b in BLOCKS) >= 10
    assert any(b.directive and b.directive[0] == "test-with" for b in BLOCKS)


def test_extractor_reads_directives_and_languages():
    text = ("intro\n```python\nprint(1)\n```\n<!-- skip-test: slow -->\n```bash\nsleep 100\n```\n"
            "```text\nnot code\n```\n<!-- needs: gpu -->\n```sh\nnvidia-smi\n```\n")
    blocks = extract_blocks(text)
    assert [(b.line, b.kind, b.directive) for b in blocks] == [
        (2, "python", None), (6, "shell", ("skip-test", "slow")), (13, "shell", ("needs", "gpu"))]
    assert blocks[0].code == "print(1)\n"
    with pytest.raises(ValueError, match="never closed"):
        extract_blocks("```python\nprint(1)\n")
    assert _only_make("make demo   # x\nmake test\n") and not _only_make("make demo\nsoftgrad check\n")


def _run(argv: list[str], cwd: Path, block: Block) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id} ran past {TIMEOUT_S} s\n--- stdout\n{exc.stdout}\n--- stderr\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{block.id} exited with {proc.returncode}\n--- code\n{block.code}--- stdout\n{proc.stdout}"
                    f"\n--- stderr\n{proc.stderr}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path):
    if block.directive is not None:
        kind, value = block.directive
        if kind == "skip-test":
            pytest.skip(value)
        if kind == "needs":
            if value != "gpu":
                raise ValueError(f"{block.id}: unknown requirement {value!r} (known: gpu)")
            torch = pytest.importorskip("torch")
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA GPU")
    for module in sorted(set(_OPTIONAL.findall(block.code))):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}, which is not installed")
    if block.kind == "shell" and _only_make(block.code):
        pytest.skip("make targets are what CI runs")
    if block.directive is not None and block.directive[0] == "test-with":
        launcher = shlex.split(block.directive[1])
        if block.kind != "python" or launcher[0] != "torchrun":
            raise ValueError(f"{block.id}: test-with supports `torchrun ARGS` on a python block")
        torchrun = BIN / "torchrun"
        if not torchrun.exists() and shutil.which("torchrun") is None:
            pytest.skip("torchrun is not installed")
        script = tmp_path / "block.py"
        script.write_text(block.code)
        _run([str(torchrun) if torchrun.exists() else "torchrun", *launcher[1:], str(script)], tmp_path, block)
    elif block.kind == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        _run([sys.executable, str(script)], tmp_path, block)
    else:
        script = tmp_path / "block.sh"
        script.write_text(block.code)
        _run(["bash", "-e", "-o", "pipefail", str(script)], tmp_path, block)
