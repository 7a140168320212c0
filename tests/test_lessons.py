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
- lessons/make_figures.py regenerates every figure the lessons show (except the loss curve of a real run).
"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS_DIR = os.path.join(ROOT, "lessons")
# NN-name.md, or NNb-name.md for a lesson split in two without renumbering the ones after it (14, 14b)
LESSON_NAME = r"\d\d[a-z]?-[\w-]+\.md"
LESSONS = sorted(f for f in os.listdir(LESSONS_DIR) if re.fullmatch(LESSON_NAME, f))
DOCS = LESSONS + ["README.md"]
BUNDLED = "checkpoints/SmolLM2-135M-Instruct"
# Figures that come from a real training run (copied from train.py's out_dir), not from make_figures.py.
RUN_FIGURES = {"loss_curve.png"}


def read(name):
    with open(os.path.join(LESSONS_DIR, name), encoding="utf-8") as f:
        return f.read()


def code_blocks(text, lang="python"):
    """[(line number of the block's first code line, source)] for every ```lang fence, in order."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"unclosed ```{lang} block starting on line {i + 1}")
            blocks.append((start + 1, "\n".join(lines[start:end])))
            i = end
        i += 1
    return blocks


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
    proc = subprocess.run([sys.executable, os.path.join(LESSONS_DIR, "make_figures.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = set(os.listdir(tmp_path))
    assert shown - RUN_FIGURES <= made, f"figures shown but not made by make_figures.py: {shown - RUN_FIGURES - made}"
    assert made <= set(os.listdir(os.path.join(LESSONS_DIR, "img"))), "make_figures.py makes figures not checked in"
