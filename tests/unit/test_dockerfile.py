"""The Dockerfile, checked without Docker, and against `make image` (image/build.py), its twin.

What is checked is what breaks silently: the entry point naming a script that does not exist, a
base image that floats, a root user, a build context that leaves out what the build copies, and
the two builds drifting apart (Debian release, packages, venv, locks, the final stage's config).
The image itself is built and run by tests/integration/test_image.py.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from image import build as image_build
from image.build import Instruction, Stage, exec_form
from workerqueue_operator import cli
from workerqueue_operator.models.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART = ROOT / "charts" / "workerqueue-operator"
CHART_VALUES = CHART / "values.yaml"


@pytest.fixture(scope="module")
def build() -> list[Stage]:
    return image_build.stages(image_build.parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def final(build: list[Stage]) -> Stage:
    return build[-1]


def last(stage: Stage, keyword: str) -> Instruction:
    found = [i for i in stage.instructions if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def test_multi_stage_build_copies_only_the_venv(build: list[Stage], final: Stage):
    assert len(build) >= 2
    builder = build[0]
    assert builder.name, "the builder stage is named, so that COPY --from names it"
    copies = [i.args for i in final.instructions if i.keyword == "COPY"]
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert any(i.keyword == "RUN" and "pip install --no-deps --no-build-isolation --no-compile ." in i.args
               for i in builder.instructions)
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in final.instructions)
    path = next(i.args for i in final.instructions if i.keyword == "ENV" and "PATH=" in i.args)
    assert "PATH=/opt/venv/bin:" in path


def debian_lock() -> dict[str, str]:
    return dict(line.split(" ", 1) for line in image_build.package_list(image_build.DEBIAN_LOCK))


def test_base_image_is_a_debian_point_release_the_lock_agrees_with(build: list[Stage]):
    for stage in build:
        assert re.fullmatch(r"debian:\d+\.\d+-slim(@sha256:[0-9a-f]{64})?", stage.base), (
            f"{stage.base!r} is not pinned to a Debian point release")
    assert len({s.base for s in build}) == 1, "builder and final share the base (the venv links its python)"
    # base-files 12.4+deb12u13 is Debian 12.13: what make image installed is the release named here.
    spec = image_build.image_spec(DOCKERFILE)
    major, minor = spec.point_release.split(".")
    assert re.fullmatch(rf"{major}\.\d+\+deb{major}u{minor}", debian_lock()["base-files"]), (
        f"image/debian.lock has base-files {debian_lock()['base-files']}, the Dockerfile debian:{spec.point_release}")


def test_debian_python_satisfies_requires_python():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in requires.removeprefix(">=").split("."))
    version = re.match(r"(\d+)\.(\d+)", debian_lock()["python3"])
    assert version and (int(version.group(1)), int(version.group(2))) >= minimum


def apt_installs(stage: Stage) -> set[str]:
    """The package lists (image/*.txt) a stage's RUN instructions install with apt-get."""
    runs = [i.args for i in stage.all("RUN") if "apt-get install" in i.args]
    assert len(runs) == 1, f"one apt-get install per stage: {runs}"
    assert "--no-install-recommends" in runs[0] and "rm -rf /var/lib/apt/lists" in runs[0]
    return set(re.findall(r"/tmp/image/([\w-]+\.txt)", runs[0]))


def test_both_builds_install_the_same_debian_packages(build: list[Stage]):
    builder, final = build
    assert apt_installs(final) == {"packages.txt"}
    assert apt_installs(builder) == {"packages.txt", "build-packages.txt"}
    # image/build.py: the same lists, nothing else, and nothing of the builder's in the final image.
    source = Path(image_build.__file__).read_text()
    assert "package_list(PACKAGES), package_list(BUILD_PACKAGES)" in source
    packages = image_build.package_list(image_build.PACKAGES)
    build_only = image_build.package_list(image_build.BUILD_PACKAGES)
    assert packages and build_only and not set(packages) & set(build_only)
    locked = debian_lock()
    assert set(packages + build_only) <= set(locked), "image/debian.lock is older than the package lists"


def test_python_packages_come_from_the_lock_with_hashes(build: list[Stage]):
    builder = build[0]
    installs = [i.args for i in builder.all("RUN") if "pip install" in i.args]
    assert installs[0] == "pip install --require-hashes --no-deps --no-compile -r image/requirements.lock"
    assert installs[1].startswith("pip install --no-deps --no-build-isolation --no-compile . ")
    assert "compileall -q -f --invalidation-mode unchecked-hash /opt/venv/lib" in installs[1]
    lock = image_build.REQUIREMENTS_LOCK.read_text()
    pinned = dict(re.findall(r"^([a-z0-9._-]+)==(\S+) \\$", lock, flags=re.MULTILINE))
    blocks = re.split(r"^(?=[a-z0-9._-]+==)", lock, flags=re.MULTILINE)[1:]
    assert all("--hash=sha256:" in block for block in blocks) and len(blocks) == len(pinned)
    assert "make image-lock" in lock, "the lock says how to regenerate it"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in project["project"]["dependencies"] + project["build-system"]["requires"]:
        requirement = Requirement(line)
        locked = pinned.get(canonicalize_name(requirement.name))
        assert locked is not None, f"{line} is not in image/requirements.lock: run `make image-lock`"
        assert requirement.specifier.contains(locked, prereleases=True), (
            f"image/requirements.lock has {requirement.name}=={locked}, pyproject.toml wants {line}: "
            "run `make image-lock`")
    # The same two steps, in the same order, in make image's chroot.
    source = Path(image_build.__file__).read_text()
    assert "--require-hashes --no-deps --no-compile --no-index --find-links /tmp/wheels" in source
    assert "pip install --quiet --no-deps --no-build-isolation --no-compile ." in source
    assert "compileall -q -f --invalidation-mode unchecked-hash {spec.venv}/lib" in source


def test_make_image_reads_the_final_stage(build: list[Stage]):
    spec = image_build.image_spec(DOCKERFILE)
    builder, final = build
    assert f"python3 -m venv {spec.venv}" in [i.args for i in builder.all("RUN")]
    assert spec.env["PATH"].startswith(f"{spec.venv}/bin:")
    assert spec.user == last(final, "USER").args
    assert spec.entrypoint == exec_form(last(final, "ENTRYPOINT")) and spec.cmd == exec_form(last(final, "CMD"))
    assert spec.exposed_ports == [f"{last(final, 'EXPOSE').args}/tcp"]
    assert spec.env["PYTHONDONTWRITEBYTECODE"] == "1", "the root filesystem is read-only"
    # Every instruction of the final stage is one make image carries out or reads.
    assert {i.keyword for i in final.instructions} <= {"RUN", "COPY", "ENV", "LABEL", "USER", "EXPOSE",
                                                       "ENTRYPOINT", "CMD"}


def test_chart_default_image_is_what_make_image_tags():
    values = yaml.safe_load(CHART_VALUES.read_text())["image"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert (values["repository"], values["tag"] or app_version) == image_build.image_reference()


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
    for mounted in ("image/packages.txt", "image/build-packages.txt", "image/requirements.lock"):
        assert not dockerignored(mounted, patterns), f"{mounted} is used by the build"
    for local in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".state/kubeconfig", "build/image/image.json",
                  "operator/workerqueue_operator/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(local, patterns), f"{local} would be sent to the build"
