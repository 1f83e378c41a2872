"""Keeps README.md true: the test command CI runs, the file tree and its line counts, the methods table.

    python -m pytest -q tests/test_readme.py
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
METHODS = ["umo.py", "psr.py", "unirl.py", "unicharacter.py", "uae.py"]


def test_ci_runs_exactly_the_readme_test_command():
    command = "python -m pytest -q tests"
    assert f"```bash\n{command}\n```" in README
    ci_lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert ci_lines[-1] == command


def test_file_tree_lists_every_python_file_with_true_line_counts():
    tree = README.split("## Files", 1)[1].split("```")[1]
    listed = dict(re.findall(r"^(\S+)\s+(\d+)? ?(?:lines)?", tree, flags=re.M))
    python_files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    python_files += [f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith((".py", ".h"))]
    for path in python_files:
        assert path in listed, f"README's file tree does not list {path}"
    for path, count in listed.items():
        assert os.path.exists(os.path.join(ROOT, path)), f"README lists {path}, which does not exist"
        if count:
            real = sum(1 for _ in open(os.path.join(ROOT, path)))
            assert abs(real - int(count)) <= max(10, 0.1 * real), f"{path}: README says {count} lines, it has {real}"


def test_methods_table_says_which_methods_exist():
    for name in METHODS:
        row = next(line for line in README.splitlines() if line.startswith("|") and f"`{name}`" in line)
        exists = os.path.exists(os.path.join(ROOT, name))
        assert ("not yet written" in row) != exists, f"the methods table is wrong about {name}: {row}"
