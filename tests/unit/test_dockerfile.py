"""The Dockerfile, checked without building it (no image can be built here).

What is checked is what breaks silently: the entry point naming a script that does not exist, a
base image that floats, a root user, a build context that leaves out what the build copies.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from workerqueue_operator import cli
from workerqueue_operator.models.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART_VALUES = ROOT / "charts" / "workerqueue-operator" / "values.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Build stages, with the global ARG defaults substituted into FROM."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "ARG" and not result:
            name, _, default = ins.args.partition("=")
            args[name] = default
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base, name, []))
        else:
            assert result, f"{ins.keyword} before the first FROM"
            result[-1].instructions.append(ins)
    return result


@pytest.fixture(scope="module")
def build() -> list[Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def final(build: list[Stage]) -> Stage:
    return build[-1]


def last(stage: Stage, keyword: str) -> Instruction:
    found = [i for i in stage.instructions if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def exec_form(instruction: Instruction) -> list[str]:
    """ENTRYPOINT/CMD must be JSON arrays: the shell form would run under /bin/sh and eat SIGTERM."""
    parsed = json.loads(instruction.args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), instruction
    return parsed


def test_multi_stage_build_copies_only_the_venv(build: list[Stage], final: Stage):
    assert len(build) >= 2
    builder = build[0]
    assert builder.name, "the builder stage is named, so that COPY --from names it"
    copies = [i.args for i in final.instructions if i.keyword == "COPY"]
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert any(i.keyword == "RUN" and "pip install ." in i.args for i in builder.instructions)
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in final.instructions)
    path = next(i.args for i in final.instructions if i.keyword == "ENV" and "PATH=" in i.args)
    assert "PATH=/opt/venv/bin:" in path


def test_base_images_are_pinned_to_a_python_release(build: list[Stage]):
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in requires.removeprefix(">=").split("."))
    for stage in build:
        match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stage.base)
        assert match, f"{stage.base!r} is not pinned to a full python version tag"
        assert (int(match.group(1)), int(match.group(2))) >= minimum, f"{stage.base} vs requires-python {requires}"
    assert len({s.base for s in build}) == 1, "builder and final share the base (the venv links its python)"


def test_runs_as_a_non_root_user_the_chart_agrees_with(final: Stage):
    user, _, group = last(final, "USER").args.partition(":")
    assert user.isdigit() and int(user) != 0, "a numeric UID lets runAsNonRoot verify it"
    assert group.isdigit() and int(group) != 0
    pod = yaml.safe_load(CHART_VALUES.read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user), int(group))


def test_entrypoint_is_a_console_script_of_the_package(final: Stage):
    entrypoint = exec_form(last(final, "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts, f"{entrypoint[0]} is not in [project.scripts] {sorted(scripts)}"
    module, _, attr = scripts[entrypoint[0]].partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert callable(target)


def test_default_command_is_accepted_by_the_cli(final: Stage):
    argv = exec_form(last(final, "ENTRYPOINT"))[1:] + exec_form(last(final, "CMD"))
    args = cli.parser().parse_args(argv)
    assert args.func is cli.cmd_run


def test_exposed_port_is_the_operator_default(final: Stage):
    port = int(last(final, "EXPOSE").args.split("/")[0])
    assert port == Settings.model_fields["http_port"].default
    assert port == yaml.safe_load(CHART_VALUES.read_text())["containerPort"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/").replace("**/", "*/")
        if any(fnmatch.fnmatchcase(p, glob) for p in prefixes):
            excluded = not negated
    return excluded


def test_build_context_has_what_the_build_copies_and_nothing_local(build: list[Stage]):
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for stage in build for ins in stage.instructions if ins.keyword == "COPY"
               and not ins.args.startswith("--from") for src in shlex.split(ins.args)[:-1]]
    assert sources, "the builder copies the sources"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert not dockerignored("operator/workerqueue_operator/cli.py", patterns)
    for local in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".state/kubeconfig",
                  "operator/workerqueue_operator/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(local, patterns), f"{local} would be sent to the build"
