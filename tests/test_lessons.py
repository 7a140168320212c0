"""
The course must keep working: every lesson's code runs, and every pointer into the source is real.

- Each ```python block of lessons/NN-*.md (and NNb-*.md) runs, in order, in ONE fresh interpreter per lesson (a
  lesson reads top to bottom, so later blocks use names from earlier ones). The blocks are compiled with the markdown file as
  their file name and their real line numbers, so a traceback points at the lesson line that broke; the failure
  message names the lesson, the block number and the error. ```bash / ```text blocks are never run.
- Every `file.py: name` reference in the lessons (and README) names a file that exists and a function, class,
  method or module-level name defined in it; every relative markdown link or image resolves.
- Every numbered lesson has runnable code and ends with an exercise, optionally followed by its worked
  solutions (a last '## Solutions' section); README lists every lesson.
- Code a lesson shows from the source is included, not retyped: a marker line right before a ```python block,
      <!-- code: lora.py LoRALinear.forward -->          (a function, class or method, decorators included)
      <!-- code: lora.py LoRALinear.forward 3-12 -->     (lines 3 to 12 of it: an excerpt)
  says what the block must equal, character for character, once dedented. Such blocks are shown, not run.
  When the source changes, `python tests/test_lessons.py --refresh` rewrites every included block.
- lessons/make_figures.py regenerates every figure the lessons show (except the loss curve of a real run).
"""
import ast
import difflib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS_DIR = os.path.join(ROOT, "lessons")
# NN-name.md, or NNb-name.md for a lesson split in two without renumbering the ones after it (14, 14b)
LESSON_NAME = r"\d\d[a-z]?-[\w-]+\.md"
LESSONS = sorted(f for f in os.listdir(LESSONS_DIR) if re.fullmatch(LESSON_NAME, f))
DOCS = LESSONS + ["README.md"]
BUNDLED = "checkpoints/SmolLM2-135M-Instruct"
# Figures that come from a real training run: the loss curve train.py drew, and what make_figures.py draws from a
# run's files with --run_dir (null_diff.png); the tests have no trained model to draw them from.
RUN_FIGURES = {"loss_curve.png", "null_diff.png"}


def read(name):
    with open(os.path.join(LESSONS_DIR, name), encoding="utf-8") as f:
        return f.read()


INCLUDE = re.compile(r"<!-- code: ([\w./-]+\.py) ([\w.]+)(?: (\d+)-(\d+))? -->")


def fences(text, lang="python"):
    """[(index of the opening fence line, index of the closing one)] for every ```lang block, in order."""
    found, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"unclosed ```{lang} block starting on line {i + 1}")
            found.append((i, end))
            i = end
        i += 1
    return found


def code_blocks(text, lang="python"):
    """[(line number of the block's first code line, source)] for every ```lang fence, in order, except the
    blocks a code marker includes from the source (shown, not run)."""
    lines = text.split("\n")
    return [(start + 2, "\n".join(lines[start + 1:end])) for start, end in fences(text, lang)
            if not (start and INCLUDE.fullmatch(lines[start - 1].strip()))]


def included_blocks(text):
    """[(marker line number, file, name, (first, last) line or None, block source or None)] for every code
    marker; the source is None when no ```python block follows the marker directly."""
    lines, opening = text.split("\n"), dict(fences(text))
    out = []
    for i, line in enumerate(lines):
        m = INCLUDE.fullmatch(line.strip())
        if m:
            end = opening.get(i + 1)
            span = (int(m[3]), int(m[4])) if m[3] else None
            out.append((i + 1, m[1], m[2], span, None if end is None else "\n".join(lines[i + 2:end])))
    return out


def _definitions(body):
    """Functions and classes of a module or class body, also those under if/try (a kernel under `if triton`)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            for part in (node.body, node.orelse, getattr(node, "finalbody", [])):
                yield from _definitions(part)


def source_of(file, name, span=None):
    """The source of a function, class or method (`Class.method`) of a file, decorators included, dedented; with
    span=(first, last), only those lines of it (1-based, inclusive), dedented again."""
    with open(os.path.join(ROOT, file), encoding="utf-8") as f:
        text = f.read()
    body, node = ast.parse(text).body, None
    for part in name.split("."):
        node = next((n for n in _definitions(body) if n.name == part), None)
        if node is None:
            raise LookupError(f"{file} defines no function, class or method {name}")
        body = node.body
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    src = textwrap.dedent("\n".join(text.split("\n")[start - 1:node.end_lineno]))
    if span:
        lines = src.split("\n")
        if not 1 <= span[0] <= span[1] <= len(lines):
            raise LookupError(f"{file} {name} has {len(lines)} lines; lines {span[0]}-{span[1]} are not all in it")
        src = textwrap.dedent("\n".join(lines[span[0] - 1:span[1]]))
    return src


# Runs in the child: blocks arrive as JSON on stdin; line numbers are kept by padding with blank lines.
RUNNER = r"""
import json, sys, traceback
path, blocks = sys.argv[1], json.load(sys.stdin)
ns = {"__name__": "__main__"}
for number, (line, src) in enumerate(blocks, 1):
    try:
        exec(compile("\n" * (line - 1) + src, path, "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"\nFAILED: {path}, python block {number} (starting on line {line})", file=sys.stderr)
        sys.exit(1)
"""


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_code_runs(lesson, request):
    blocks = code_blocks(read(lesson))
    code = "\n".join(src for _, src in blocks)
    if BUNDLED in code:
        request.getfixturevalue("bundled_dir")  # converts the bundled model once if it is not on disk yet
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    if "triton" in code:
        env["TRITON_INTERPRET"] = "1"  # the kernel lesson runs Triton on the CPU through its interpreter
    path = os.path.join("lessons", lesson)
    proc = subprocess.run([sys.executable, "-c", RUNNER, path], input=json.dumps(blocks), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{path}: a python block failed\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"
                    f"\n--- stdout (tail) ---\n{proc.stdout[-1500:]}", pytrace=False)


def defined_names(path):
    """Functions, classes, module-level names, and Class.member names defined in a Python file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()

    def targets(node):
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    def visit(body, prefix=""):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef) and not prefix:
                    visit(node.body, node.name + ".")
            elif isinstance(node, (ast.If, ast.Try)):  # e.g. a kernel defined under `if triton is not None:`
                for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(part, prefix)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, prefix)
            else:
                names.update(prefix + t for t in targets(node))
    visit(tree.body)
    return names


REF = re.compile(r"`([\w./-]+\.py): ([\w.]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS)
def test_references_exist(doc):
    text = read(doc)
    problems = []
    for file, name in REF.findall(text):
        path = os.path.join(ROOT, file)
        if not os.path.isfile(path):
            problems.append(f"`{file}: {name}`: no file {file}")
        elif name not in defined_names(path):
            problems.append(f"`{file}: {name}`: {file} defines no {name}")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors in the same page
        if not os.path.exists(os.path.normpath(os.path.join(LESSONS_DIR, target.split("#")[0]))):
            problems.append(f"link ({target}) does not resolve from lessons/")
    assert not problems, f"lessons/{doc}:\n" + "\n".join(problems)


@pytest.mark.parametrize("lesson", LESSONS)
def test_included_code_matches_source(lesson):
    """Every block under a code marker is the named source, character for character: a lesson cannot show code
    that drifted from the file it teaches."""
    problems = []
    for line, file, name, span, shown in included_blocks(read(lesson)):
        where = f"line {line}, <!-- code: {file} {name}{f' {span[0]}-{span[1]}' if span else ''} -->"
        if shown is None:
            problems.append(f"{where}: no ```python block right after the marker")
            continue
        try:
            want = source_of(file, name, span)
        except (OSError, LookupError) as e:
            problems.append(f"{where}: {e}")
            continue
        if shown != want:
            diff = "\n".join(difflib.unified_diff(want.split("\n"), shown.split("\n"), f"{file} (source)",
                                                  f"lessons/{lesson} (shown)", lineterm="", n=1))
            problems.append(f"{where}: the block differs from the source\n{diff[:2000]}")
    assert not problems, (f"lessons/{lesson}:\n" + "\n".join(problems)
                          + "\nIf the source is right, refresh the lessons: python tests/test_lessons.py --refresh")


def test_includes_find_methods_decorators_excerpts_and_are_not_run(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("import torch\n\n\nclass A:\n    @torch.no_grad()\n    def f(self, x):\n"
                                   "        y = x + 1\n        return y\n\n\nif True:\n    def g():\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert source_of("m.py", "A.f") == "@torch.no_grad()\ndef f(self, x):\n    y = x + 1\n    return y"
    assert source_of("m.py", "A.f", (3, 4)) == "y = x + 1\nreturn y"
    assert source_of("m.py", "g") == "def g():\n    pass"
    with pytest.raises(LookupError):
        source_of("m.py", "A.h")
    text = "<!-- code: m.py g -->\n```python\ndef g():\n    pass\n```\n\n```python\nprint(1)\n```\n"
    assert code_blocks(text) == [(8, "print(1)")]
    assert included_blocks(text) == [(1, "m.py", "g", None, "def g():\n    pass")]


def refresh(lesson):
    """Rewrite every block under a code marker of a lesson from the source; returns the markers it changed."""
    text = read(lesson)
    lines, changed = text.split("\n"), []
    for line, file, name, span, shown in reversed(included_blocks(text)):  # from the end: indices stay valid
        if shown is None:
            raise SystemExit(f"lessons/{lesson} line {line}: no ```python block right after the marker")
        want = source_of(file, name, span)
        if shown != want:
            n_old = len(shown.split("\n")) if shown else 0
            lines[line + 1:line + 1 + n_old] = want.split("\n")
            changed.append(f"{file} {name}")
    if changed:
        with open(os.path.join(LESSONS_DIR, lesson), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return changed[::-1]


def test_defined_names_sees_methods_constants_and_guarded_defs(tmp_path):
    src = ("X = 1\nY: int = 2\nclass A:\n    z = 3\n    def f(self): pass\nif True:\n    def g(): pass\n"
           "def h():\n    inner = 4\n")
    (tmp_path / "m.py").write_text(src)
    assert defined_names(str(tmp_path / "m.py")) == {"X", "Y", "A", "A.z", "A.f", "g", "h"}


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_shape(lesson):
    text = read(lesson)
    number = lesson.split("-")[0]
    assert text.startswith(f"# {number} "), f"{lesson} must start with '# {number} <title>'"
    assert code_blocks(text), f"{lesson} has no ```python block"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    if headings and headings[-1] == "Solutions":
        headings = headings[:-1]  # worked solutions may follow the exercise
    assert headings and headings[-1].startswith("Exercise"), \
        f"{lesson} must end with an '## Exercise' section (optionally followed by '## Solutions')"


def test_readme_lists_every_lesson_in_order():
    text = read("README.md")
    linked = re.findall(rf"\]\(({LESSON_NAME})\)", text)
    order = list(dict.fromkeys(linked))
    assert order[:len(LESSONS)] == LESSONS, f"README must link the lessons in reading order: {LESSONS}"


def test_figures_are_reproducible(tmp_path, bundled_dir):
    """make_figures.py writes every figure the lessons show (a real run's loss curve excepted).
    loss_mask.png tokenizes a real row with the bundled tokenizer, hence bundled_dir."""
    shown = set()
    for doc in DOCS:
        shown |= {os.path.basename(t) for t in LINK.findall(read(doc)) if t.startswith("img/")}
    proc = subprocess.run([sys.executable, os.path.join(LESSONS_DIR, "make_figures.py"), f"--out_dir={tmp_path}"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = set(os.listdir(tmp_path))
    assert shown - RUN_FIGURES <= made, f"figures shown but not made by make_figures.py: {shown - RUN_FIGURES - made}"
    assert made <= set(os.listdir(os.path.join(LESSONS_DIR, "img"))), "make_figures.py makes figures not checked in"


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit("usage: python tests/test_lessons.py --refresh   (rewrites the code blocks the lessons include "
                 "from the source; run the tests with python -m pytest tests/test_lessons.py)")
    for name in LESSONS:
        try:
            for what in refresh(name):
                print(f"lessons/{name}: refreshed {what}")
        except (OSError, LookupError) as e:
            sys.exit(f"lessons/{name}: {e}")
