"""The README as a new user reads it: its CPU example and its recipe commands run as written, and CI runs its test
command."""

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


QUICK_START = next(b for b in blocks("bash") if b.startswith("simba-compress --model demo"))


def test_the_cpu_python_example_runs_as_written(tmp_path):
    example = README.split("<!-- readme-example: cpu -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("keep per layer: [1.0") and lines[-1] == "True"  # it came back pruned
    assert (tmp_path / "out" / "demo-python" / "model.safetensors").exists()


def test_the_recipe_commands_run_as_written_beside_the_quick_start(tmp_path, monkeypatch, capsys):
    """Both commands of the Recipes paragraph, from a folder holding recipes/ as the repository does; neither
    writes into the quick start's folder."""
    from simba_compress.cli import main

    quick_output = shlex.split(QUICK_START.splitlines()[0].split("#")[0])[-1]  # simba-compress ... --output X
    recipe_block = next(b for b in blocks("bash") if "--recipe recipes/demo.yaml" in b)
    commands = [shlex.split(line.split("#")[0]) for line in recipe_block.strip().splitlines()]
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        assert cmd[0] == "simba-compress"
        assert main(cmd[1:]) == 0, capsys.readouterr().err
        wrote = capsys.readouterr().out.splitlines()[0].removeprefix("wrote ")
        assert wrote != str((tmp_path / quick_output).resolve()) and (tmp_path / quick_output).exists() is False
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo-recipe", "demo-recipe-0.5"]


def test_ci_runs_the_readme_test_command():
    readme_test = next(line.split("#")[0].strip() for line in QUICK_START.splitlines() if "pytest" in line)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line and
          not line.lstrip().startswith("#")]
    assert ci == [readme_test] == ["python -m pytest -q"]


@pytest.mark.parametrize("path", ["simba_compress", "benchmarks", "README.md", "benchmarks/RESULTS.md"])
def test_no_docstring_points_to_a_file_the_repository_does_not_hold(path):
    """Every file named in the package's, the benchmarks' and the docs' text (x.py, x.sh, x.md, x.yaml) is in the
    repository, or is one that the code itself writes (its name is a string in the code)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    names = set(files) | {f.rsplit("/", 1)[-1] for f in files}
    code = "".join((REPO / f).read_text(errors="ignore") for f in files if f.endswith(".py"))
    target = REPO / path
    texts = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.suffix in (".py", ".sh", ".md"))
    missing = []
    for file in texts:
        rel = file.relative_to(REPO).as_posix()
        if rel.startswith("benchmarks/results/") or rel not in files:
            continue
        for m in re.findall(r"(?<![\w/.$-])((?:\.\./)?[\w./-]*\w\.(?:py|sh|md|yaml))\b", file.read_text(errors="ignore")):
            if m.startswith(("/", "../", "mamba_ssm/")) or m in names or m.rsplit("/", 1)[-1] in names:
                continue  # outside the repository and named as such (/tmp/..., ../shared/...), or another package's
            if f'"{m}"' in code or f"'{m}'" in code or f"/{m}" in code:
                continue  # a file the code writes
            missing.append(f"{rel}: {m}")
    assert not missing
