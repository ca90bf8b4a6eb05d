"""`make image`: the operator's image built without Docker, the same image the Dockerfile describes.

The route: two root filesystems from Debian's packages with mmdebstrap (the Dockerfile's builder
and final stages), the operator pip-installed into a venv inside the builder by chroot, the venv
copied onto the final one, and that turned into an OCI image with umoci. skopeo writes it as an OCI
archive and a docker-archive (what `kind load image-archive` and `ctr images import` take).

What the image is made of is said once: the Dockerfile gives the Debian release, the venv path and
the final stage's ENV/USER/EXPOSE/ENTRYPOINT/CMD/LABELs (parsed here); image/packages.txt and
image/build-packages.txt the Debian packages; image/requirements.lock the Python packages, with
hashes; image/debian.lock the Debian package versions of the last `make image-lock`.

Standard library only: it runs on the host's python3, before any venv exists. Root filesystems are
cached in ~/.cache/workerqueue-operator/image (keyed by everything that goes into them), with the
.debs and the wheels, so that a rebuild only reinstalls the operator. The build is reproducible:
what it makes is dated at the last commit of its sources and the bytecode is hash-based, so the
same sources and locked packages give the same digest, from a warm cache or a cold one.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HERE = ROOT / "image"
PACKAGES = HERE / "packages.txt"
BUILD_PACKAGES = HERE / "build-packages.txt"
REQUIREMENTS_LOCK = HERE / "requirements.lock"
DEBIAN_LOCK = HERE / "debian.lock"

# Debian's major release -> the suite mmdebstrap installs (the Dockerfile names the release).
SUITES = {"12": "bookworm", "13": "trixie"}
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# The PATH of Debian's images, which the Dockerfile's `ENV PATH=...:$PATH` extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What Debian's -slim images leave out (debuerreotype's slimify list), kept out of ours too.
SLIM_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/lintian/overrides/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
)
VARIANT = "minbase"  # Priority: required plus apt, what Debian's images are built from
# Merged /usr by mmdebstrap's hook, as in Debian's images: the usrmerge package would do it at the
# price of perl and its modules (~45 MB) in the image.
HOOKS = ("/usr/share/mmdebstrap/hooks/merged-usr",)
# Part of the root filesystems' cache key: bumped when the way they are made changes.
CACHE_FORMAT = 2

# -- the Dockerfile ------------------------------------------------------------------------------


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
    if pending:
        raise ValueError("the Dockerfile ends inside a continued instruction")
    return instructions


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


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
            result.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif not result:
            raise ValueError(f"{ins.keyword} before the first FROM")
        else:
            result[-1].instructions.append(ins)
    return result


def exec_form(instruction: Instruction) -> list[str]:
    """ENTRYPOINT/CMD must be JSON arrays: the shell form would run under /bin/sh and eat SIGTERM."""
    parsed = json.loads(instruction.args)
    if not (isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)):
        raise ValueError(f"{instruction.keyword} is not in exec form: {instruction.args}")
    return parsed


def key_values(args: str) -> dict[str, str]:
    """`ENV`/`LABEL` arguments in the `key=value ...` form."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"not key=value: {word!r} (the legacy `ENV key value` form is not supported)")
        pairs[key] = value
    return pairs


@dataclass(frozen=True)
class ImageSpec:
    """What the image is, as the Dockerfile says it."""

    suite: str
    point_release: str  # e.g. "12.13", of debian:12.13-slim
    venv: str
    user: str
    env: dict[str, str]
    labels: dict[str, str]
    exposed_ports: list[str]
    entrypoint: list[str]
    cmd: list[str]
    workdir: str


def image_spec(dockerfile: Path = DOCKERFILE) -> ImageSpec:
    build = stages(parse_dockerfile(dockerfile.read_text()))
    if len(build) != 2 or build[0].base != build[1].base:
        raise ValueError("expected a builder and a final stage on the same base")
    match = re.fullmatch(r"debian:((\d+)\.\d+)-slim(@sha256:[0-9a-f]{64})?", build[-1].base)
    if not match or match.group(2) not in SUITES:
        raise ValueError(f"{build[-1].base!r}: expected debian:<major>.<minor>-slim of {sorted(SUITES)}")
    builder, final = build
    copies = [shlex.split(i.args) for i in final.all("COPY")]
    if len(copies) != 1 or copies[0][0] != f"--from={builder.name}" or copies[0][1] != copies[0][2]:
        raise ValueError(f"the final stage must copy exactly the venv from the builder: {copies}")
    env: dict[str, str] = {}
    for ins in final.all("ENV"):
        for key, value in key_values(ins.args).items():
            env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), BASE_PATH if m.group(1) == "PATH"
                                                                     else ""), value)
    labels = {k: v for ins in final.all("LABEL") for k, v in key_values(ins.args).items()}
    workdirs = final.all("WORKDIR")
    return ImageSpec(
        suite=SUITES[match.group(2)], point_release=match.group(1), venv=copies[0][2],
        user=final.all("USER")[-1].args, env=env, labels=labels,
        exposed_ports=[p if "/" in p else f"{p}/tcp" for ins in final.all("EXPOSE") for p in ins.args.split()],
        entrypoint=exec_form(final.all("ENTRYPOINT")[-1]), cmd=exec_form(final.all("CMD")[-1]),
        workdir=workdirs[-1].args if workdirs else "/",
    )


def package_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def image_reference() -> tuple[str, str]:
    """(name, tag) `make image` tags: the package's name and version, the chart's default image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["name"]), str(project["version"])


# What the image is built from (files and folders of the repository).
SOURCES = ("Dockerfile", "pyproject.toml", "README.md", "image", "operator")


def inputs_digest() -> str:
    """Of every file the image is built from: the container test rebuilds when it differs."""
    files = [path for source in SOURCES for path in
             ([ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*")))]
    digest = hashlib.sha256()
    for path in files:
        generated = "__pycache__" in path.parts or ".egg-info" in str(path) or path.suffix == ".pyc"
        if path.is_file() and not generated:
            digest.update(f"{path.relative_to(ROOT)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


# -- running things ------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def run(*command: str | Path, env: dict[str, str] | None = None, capture: bool = False,
        log_file: Path | None = None) -> str:
    """Output to stderr, or captured, or into `log_file` (whose tail is shown if the command fails)."""
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.PIPE if capture else sys.stderr
        if log_file is not None:
            out = stack.enter_context(log_file.open("w"))
        done = subprocess.run([str(c) for c in command], env=env, text=True, check=False, stdout=out,
                              stderr=subprocess.STDOUT if log_file is not None else None)
    if done.returncode != 0:
        if log_file is not None:
            sys.stderr.write("".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:]))
        raise SystemExit(f"[image] failed ({done.returncode}): {shlex.join(str(c) for c in command)}")
    return done.stdout or ""


def dpkg_versions(rootfs: Path) -> dict[str, str]:
    out = run("dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\\n",
              capture=True)
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def read_debian_lock() -> dict[str, str]:
    if not DEBIAN_LOCK.exists():
        return {}
    return dict(line.split(" ", 1) for line in package_list(DEBIAN_LOCK))


# -- the root filesystems ------------------------------------------------------------------------


def debootstrap(spec: ImageSpec, packages: list[str], lock: dict[str, str], cache: Path) -> Path:
    """A tarball of Debian's minbase with these packages, built once per distinct input."""
    sources = [f"deb {MIRROR} {spec.suite} main", f"deb {MIRROR} {spec.suite}-updates main",
               f"deb {SECURITY_MIRROR} {spec.suite}-security main"]
    # Pin-Priority 1001 takes the locked version wherever the mirror still has it (even over a newer
    # one); a version Debian has since replaced falls back to the current one, which the drift check
    # after the build reports.
    preferences = "".join(f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n"
                          for name, version in sorted(lock.items()))
    inputs = [CACHE_FORMAT, VARIANT, HOOKS, sources, sorted(packages), SLIM_DPKG_OPTIONS, preferences]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    tarball = cache / f"rootfs-{spec.suite}-{key}.tar"
    if tarball.exists():
        log(f"root filesystem from the cache: {tarball.name} ({', '.join(packages)})")
        return tarball
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # Only the .debs: apt's lock and partial/ (synced out too) would carry an earlier build's times.
    for leftover in debs.iterdir():
        if leftover.suffix != ".deb":
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    started = time.monotonic()
    log(f"mmdebstrap {spec.suite} {VARIANT} + {', '.join(packages)} (log: {cache / 'mmdebstrap.log'})")
    with tempfile.TemporaryDirectory(dir=cache) as work:
        prefs = Path(work) / "preferences"
        prefs.write_text(preferences)
        partial = Path(work) / "rootfs.tar"
        run("mmdebstrap", "--mode=root", f"--variant={VARIANT}", "--format=tar", "--quiet",
            f"--include={','.join(packages)}", *(f"--dpkgopt={o}" for o in SLIM_DPKG_OPTIONS),
            # The .debs are kept between builds (the sync hooks are mmdebstrap's documented way).
            "--skip=essential/unlink", *(f"--hook-dir={h}" for h in HOOKS),
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives "$1"/etc/apt/preferences.d',
            f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
            f"--setup-hook=upload {prefs} /etc/apt/preferences.d/workerqueue-operator-lock",
            f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
            '--customize-hook=rm -f "$1"/etc/apt/preferences.d/workerqueue-operator-lock',
            spec.suite, partial, *sources, log_file=cache / "mmdebstrap.log")
        partial.rename(tarball)
    log(f"root filesystem built in {time.monotonic() - started:.0f}s")
    return tarball


def prune(cache: Path, keep: set[Path]) -> None:
    """Root filesystems of earlier inputs (package lists, locks): each is 100+ MB."""
    for stale in set(cache.glob("rootfs-*.tar")) - keep:
        log(f"removing the outdated {stale.name} from the cache")
        stale.unlink()


def extract(tarball: Path, rootfs: Path) -> Path:
    rootfs.mkdir()
    run("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tarball, "-C", rootfs)
    return rootfs


def build_venv(spec: ImageSpec, builder: Path, cache: Path) -> None:
    """In the builder by chroot, as the Dockerfile's builder stage does it: the locked dependencies,
    then the operator itself (non-editable), then a smoke run of its console script."""
    src = builder / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "operator", src / "operator",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", "*.egg-info"))
    (src / "image").mkdir()
    shutil.copy2(REQUIREMENTS_LOCK, src / "image" / "requirements.lock")
    # pip in the chroot trusts what pip on the host trusts (the host's bundle may hold a proxy's CA).
    host_ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    shutil.copy2(host_ca, builder / "tmp" / "host-ca.crt")
    shutil.copy2("/etc/resolv.conf", builder / "etc" / "resolv.conf", follow_symlinks=True)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{spec.venv}/bin:{BASE_PATH}", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_CERT": "/tmp/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
           "PIP_NO_CACHE_DIR": "1", "PIP_PROGRESS_BAR": "off"}
    env.update({k: v for k, v in os.environ.items()
                if k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY",
                         "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")})
    steps = [
        f"python3 -m venv {spec.venv}",
        "cd /src",
        # Download (kept on the host between builds: pip's HTTP cache does not keep these), then install
        # from there, each file checked against the lock's hashes both times.
        "pip download --quiet --require-hashes --no-deps -r image/requirements.lock -d /tmp/wheels",
        "pip install --quiet --require-hashes --no-deps --no-compile --no-index --find-links /tmp/wheels"
        " -r image/requirements.lock",
        "pip install --quiet --no-deps --no-build-isolation --no-compile .",
        f"python3 -m compileall -q -f --invalidation-mode unchecked-hash {spec.venv}/lib",
        f"{shlex.quote(spec.entrypoint[0])} --help >/dev/null",
    ]
    # A private mount namespace: /dev, /proc and the wheels are unmounted when it ends, whatever
    # happens to this process.
    script = "\n".join([
        "set -eu",
        'mount --bind /dev "$R/dev"', 'mount -t proc proc "$R/proc"',
        'mkdir -p "$R/tmp/wheels"', 'mount --bind "$WHEELS" "$R/tmp/wheels"',
        f'chroot "$R" /usr/bin/env -i {" ".join(shlex.quote(f"{k}={v}") for k, v in env.items())} '
        f"/bin/sh -euc {shlex.quote(' && '.join(steps))}",
    ])
    run("unshare", "--mount", "--propagation", "private", "sh", "-c", script,
        env={**os.environ, "R": str(builder), "WHEELS": str(wheels)})


# -- the image -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    reference: str
    oci_archive: Path
    docker_archive: Path
    manifest_digest: str
    image_id: str
    compressed_bytes: int
    uncompressed_bytes: int


def source_date_epoch() -> int:
    """The time the image says it was made: $SOURCE_DATE_EPOCH, else that of the last commit that
    changed what it is built from (another commit leaves the digest as it was), else now."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct", "--", *SOURCES],
                          capture_output=True, text=True, check=False)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip() else int(time.time())


def newest_time(rootfs: Path) -> float:
    return max(os.lstat(Path(folder) / name).st_mtime
               for folder, dirs, files in os.walk(rootfs) for name in [*dirs, *files])


def settle_times(rootfs: Path, made_since: float, epoch: int) -> None:
    """Every file made by a build (times from `made_since` on: mmdebstrap's run, which it clamps
    to its start, and the venv) dated `epoch`. What comes out of the .debs keeps their times."""
    for folder, dirs, files in os.walk(rootfs):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if os.lstat(path).st_mtime >= made_since:
                os.utime(path, (epoch, epoch), follow_symlinks=False)


def make_image(spec: ImageSpec, rootfs: Path, layout: Path, tag: str, epoch: int) -> None:
    layer = layout.parent / "layer.tar"
    # Sorted, numeric owners, no access/change times, fixed extended-header names: the layer depends
    # on the files alone, not on readdir's order, the host's user names, the clock or tar's PID.
    run("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        "-C", rootfs, "-cf", layer, *sorted(os.listdir(rootfs)))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", "--history.created", created,
        "--history.created_by", "image/build.py: the root filesystem", layer)
    layer.unlink()
    config = ["--config.user", spec.user, "--config.workingdir", spec.workdir]
    for key, value in spec.env.items():
        config += ["--config.env", f"{key}={value}"]
    for port in spec.exposed_ports:
        config += ["--config.exposedports", port]
    for word in spec.entrypoint:
        config += ["--config.entrypoint", word]
    for word in spec.cmd:
        config += ["--config.cmd", word]
    for key, value in spec.labels.items():
        config += ["--config.label", f"{key}={value}"]
    run("umoci", "config", "--image", f"{layout}:{tag}", *config, "--created", created,
        "--history.created", created, "--history.created_by", "image/build.py: the Dockerfile's final stage")
    run("umoci", "gc", "--layout", layout)


def blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def describe(layout: Path, tag: str) -> tuple[str, str, int, int]:
    """(manifest digest, config digest, compressed size, uncompressed size) of the tagged image."""
    index = json.loads((layout / "index.json").read_text())
    (descriptor,) = [m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads(blob(layout, descriptor["digest"]).read_text())
    compressed = descriptor["size"] + manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    uncompressed = 0
    for layer in manifest["layers"]:
        with blob(layout, layer["digest"]).open("rb") as f, gzip.open(f) as g:
            while chunk := g.read(1 << 20):
                uncompressed += len(chunk)
    return descriptor["digest"], manifest["config"]["digest"], compressed, uncompressed


def check_debian_lock(installed: dict[str, dict[str, str]], lock: dict[str, str], strict: bool) -> None:
    drift = sorted({f"{name} {version} (locked: {lock.get(name, 'absent')})"
                    for versions in installed.values() for name, version in versions.items()
                    if lock.get(name) != version})
    if not drift:
        log(f"Debian packages match image/debian.lock ({len(lock)} packages)")
        return
    message = (f"{len(drift)} Debian package(s) differ from image/debian.lock (the mirror only keeps the "
               f"current versions): {', '.join(drift[:10])}{' ...' if len(drift) > 10 else ''}; "
               "`make image-lock` takes them")
    if strict:
        raise SystemExit(f"[image] {message}")
    log(f"WARNING: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "image",
                        help="folder of the archives (default: build/image)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "WQ_IMAGE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "workerqueue-operator" / "image")), help="root filesystems, .debs and wheels")
    parser.add_argument("--update-debian-lock", action="store_true",
                        help="write the installed Debian package versions to image/debian.lock")
    parser.add_argument("--strict", action="store_true", default=os.environ.get("WQ_IMAGE_STRICT") == "1",
                        help="fail when Debian packages differ from image/debian.lock (default: warn)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("[image] needs root (mmdebstrap --mode=root, chroot, mounts)")
    started = time.monotonic()
    inputs = inputs_digest()
    spec = image_spec()
    name, tag = image_reference()
    reference = f"{name}:{tag}"
    packages, build_packages = package_list(PACKAGES), package_list(BUILD_PACKAGES)
    lock = {} if args.update_debian_lock else read_debian_lock()
    args.cache.mkdir(parents=True, exist_ok=True)
    final_tar = debootstrap(spec, packages, lock, args.cache)
    builder_tar = debootstrap(spec, packages + build_packages, lock, args.cache)
    if not args.update_debian_lock:  # the pinned ones are likely to be the next build's
        prune(args.cache, {final_tar, builder_tar})
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache, prefix="build-") as tmp:
        work = Path(tmp)
        builder = extract(builder_tar, work / "builder")
        rootfs = extract(final_tar, work / "rootfs")
        installed = {"builder": dpkg_versions(builder), "final": dpkg_versions(rootfs)}
        if args.update_debian_lock:
            merged = {**installed["final"], **installed["builder"]}
            DEBIAN_LOCK.write_text(
                "# Debian package versions of `make image` (builder and final root filesystems), written by\n"
                "# `make image-lock`; the build pins these and reports any the mirror no longer has.\n"
                + "".join(f"{n} {v}\n" for n, v in sorted(merged.items())))
            log(f"wrote image/debian.lock ({len(merged)} packages)")
        else:
            check_debian_lock(installed, lock, args.strict)
        log("installing the operator into the venv (chroot)")
        build_venv(spec, builder, args.cache)
        debootstrapped = newest_time(rootfs)
        shutil.copytree(builder / spec.venv.lstrip("/"), rootfs / spec.venv.lstrip("/"), symlinks=True)
        settle_times(rootfs, debootstrapped, source_date_epoch())
        layout = work / "layout"
        log("making the OCI image (umoci)")
        make_image(spec, rootfs, layout, tag, source_date_epoch())
        manifest_digest, image_id, compressed, uncompressed = describe(layout, tag)
        stem = f"{name}-{tag}"
        oci_archive, docker_archive = args.output / f"{stem}.oci.tar", args.output / f"{stem}.docker.tar"
        for path in (oci_archive, docker_archive):
            path.unlink(missing_ok=True)
        run("skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"oci-archive:{oci_archive}:{tag}")
        run("skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{docker_archive}:{reference}")
    built = Built(reference, oci_archive, docker_archive, manifest_digest, image_id, compressed, uncompressed)
    (args.output / "image.json").write_text(json.dumps({
        "reference": built.reference, "ociArchive": str(built.oci_archive),
        "dockerArchive": str(built.docker_archive), "manifestDigest": built.manifest_digest,
        "imageId": built.image_id, "compressedBytes": built.compressed_bytes,
        "uncompressedBytes": built.uncompressed_bytes, "inputs": inputs}, indent=2) + "\n")
    print(f"image      {built.reference}\n"
          f"digest     {built.manifest_digest} (OCI manifest)\n"
          f"image id   {built.image_id} (config digest, the same in both archives)\n"
          f"size       {built.compressed_bytes / 1e6:.1f} MB compressed, {built.uncompressed_bytes / 1e6:.1f} MB "
          f"uncompressed\n"
          f"archives   {built.oci_archive}\n           {built.docker_archive}\n"
          f"built in   {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
