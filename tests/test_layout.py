"""The house: what a researcher edits on top, the infrastructure in sftloop/ beneath, no import circle,
and chat.py free of the training stack."""

import ast
import subprocess
import sys

from helpers import REPO

TOP = ["train_loop.py", "batches.py", "collate.py", "templates.py", "chat.py"]


def project_modules():
    """{module name: file} for every module of the project (top level, sftloop, tools)."""
    files = [REPO / f for f in TOP] + sorted((REPO / "sftloop").glob("*.py")) + sorted((REPO / "tools").glob("*.py"))
    names = {}
    for f in files:
        rel = f.relative_to(REPO).with_suffix("")
        names[".".join(p for p in rel.parts if p != "__init__")] = f
    return names


def imports_of(f, modules):
    """The project modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} & modules.keys()
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def test_only_the_files_a_researcher_edits_or_runs_are_at_the_top_level():
    assert sorted(p.name for p in REPO.glob("*.py")) == sorted(TOP)


def test_no_import_circle():
    modules = project_modules()
    graph = {m: imports_of(f, modules) - {m, "sftloop", "tools"} for m, f in modules.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
    # the package's modules never import the researcher's files, except the leaves they build on (and
    # the pre-flight check, which measures the run's own batches from batches.py, as the loop takes them)
    for m, deps in graph.items():
        if m.startswith("sftloop.") and m != "sftloop.preflight":
            assert deps & {"train_loop", "batches", "chat"} == set(), (m, deps)


def test_chat_does_not_import_the_training_stack():
    code = "import sys, chat; print(sorted(m for m in ('accelerate', 'deepspeed', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    import re

    found, fenced = set(), False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_link_in_the_docs_reaches_a_file_and_heading():
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), (page.name, target)
            if anchor:
                assert anchor in anchors(dest.read_text()), (page.name, target)
