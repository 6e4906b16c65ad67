"""The GPU image's lock agrees with pyproject.toml, and the GPU Dockerfile installs that lock.

    pytest -q tests/unit/test_environment_lock.py

environments/requirements-gpu.lock pins (==) every dependency in pyproject.toml's
[project].dependencies, each pin inside its pyproject range; environments/Dockerfile.gpu starts
from a CUDA 12 image, takes torch from the matching CUDA index and pip-installs exactly the lock.
Bumping a range in pyproject.toml without the lock (or the reverse) fails here, naming the package
and the fix. The checkers take paths, so the tests below also run them on broken copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "environments" / "requirements-gpu.lock"
DOCKERFILE = REPO / "environments" / "Dockerfile.gpu"

# The image the lock is for: markers in pyproject.toml are judged as pip judges them there.
IMAGE_MARKER_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
BASE_IMAGE = re.compile(r"nvidia/cuda:(?P<major>\d+)\.(?P<minor>\d+)(\.\d+)?-cudnn-devel-ubuntu(22|24)\.04")
TORCH_INDEX = re.compile(r"download\.pytorch\.org/whl/cu(?P<tag>\d+)")


def read_lock(lock: Path) -> tuple[dict[str, list[tuple[int, Requirement]]], list[str]]:
    """The lock's requirements by normalized name (with line numbers), and its unreadable lines."""
    pins: dict[str, list[tuple[int, Requirement]]] = {}
    problems = []
    for number, raw in enumerate(lock.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # blank, comment, or a pip option line
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            problems.append(f"{lock.name} line {number}: {line!r} is not a requirement ({err}); "
                            "write name==version.")
            continue
        pins.setdefault(canonicalize_name(req.name), []).append((number, req))
    return pins, problems


def pinned_version(req: Requirement) -> Version | None:
    """The version of an exact `name==version` pin, else None."""
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        return None
    return Version(specs[0].version)


def lock_problems(pyproject: Path, lock: Path) -> list[str]:
    """Every way the lock disagrees with pyproject.toml's dependencies, each with its fix."""
    pins, problems = read_lock(lock)
    for name, entries in sorted(pins.items()):
        if len(entries) > 1:
            lines = ", ".join(str(number) for number, _ in entries)
            problems.append(f"{name} is pinned {len(entries)} times in {lock.name} (lines {lines}): "
                            "keep one pin.")
        for number, req in entries:
            if pinned_version(req) is None:
                problems.append(f"{lock.name} line {number}: {req} is not an exact pin: write "
                                f"{name}==<the version tested with the others>.")
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for text in dependencies:
        wanted = Requirement(text)
        if wanted.marker is not None and not wanted.marker.evaluate(IMAGE_MARKER_ENV):
            continue  # not installed in the image (e.g. a macOS-only dependency)
        name = canonicalize_name(wanted.name)
        if name not in pins:
            problems.append(f"{name}: pyproject.toml requires {text!r} but {lock.name} has no pin "
                            f"for it: add {name}==<version> (one inside the range, tested with the "
                            "other pins).")
            continue
        for number, req in pins[name]:
            version = pinned_version(req)
            # A local label (2.13.0+cu126) names a build, not a release: ranges judge the release.
            if version is not None and not wanted.specifier.contains(version.public, prereleases=True):
                problems.append(f"{name}: {lock.name} line {number} pins {version}, outside "
                                f"pyproject.toml's {text!r}. Pin a version inside the range (install "
                                "it with the other pins and run the tests), or, if the pin is the one "
                                "to keep, change the range in pyproject.toml.")
    return problems


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerfile_problems(dockerfile: Path, lock: Path) -> list[str]:
    """Every way the Dockerfile fails to install the lock on a CUDA 12 base, each with its fix."""
    instructions = dockerfile_instructions(dockerfile)
    problems = []
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    base = BASE_IMAGE.fullmatch(bases[-1]) if bases else None
    if base is None or base["major"] != "12":
        problems.append(f"{dockerfile.name}: FROM {bases[-1] if bases else '(none)'} is not a CUDA 12 "
                        "cudnn-devel image; use e.g. nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04 (devel: "
                        "DeepSpeed compiles its ops with nvcc).")
    text = " ".join(args for _, args in instructions)
    indexes = sorted({"cu" + match["tag"] for match in TORCH_INDEX.finditer(text)})
    if not problems and indexes != [f"cu{base['major']}{base['minor']}"]:
        cuda = f"{base['major']}.{base['minor']}"
        problems.append(f"{dockerfile.name}: torch comes from {', '.join(indexes) or 'PyPI'} but the base "
                        f"image is CUDA {cuda}; use --extra-index-url https://download.pytorch.org/whl/"
                        f"cu{base['major']}{base['minor']} on every pip install (DeepSpeed compiles its "
                        "ops with the image's nvcc against this torch; PyPI's torch is a CUDA 13 build).")
    destinations = []
    for keyword, args in instructions:
        parts = [p for p in args.split() if not p.startswith("--")]  # drop --chown= and the like
        if keyword in ("COPY", "ADD") and len(parts) >= 2 and any(
                Path(source).name == lock.name for source in parts[:-1]):
            destination = parts[-1]
            destinations.append(destination + lock.name if destination.endswith("/") else destination)
    if not destinations:
        problems.append(f"{dockerfile.name} never copies {lock.name} into the image: add "
                        f"`COPY {lock.name} /tmp/{lock.name}` (the build context is environments/).")
    installs = [
        command for keyword, args in instructions if keyword == "RUN"
        for command in re.split(r"&&|;", args) if re.search(r"\bpip install\b", command)
    ]
    installed = any(
        re.search(rf"(-r|--requirement)[ =]{re.escape(destination)}(\s|$)", command)
        for command in installs for destination in destinations
    )
    if destinations and not installed:
        problems.append(f"{dockerfile.name} copies {lock.name} to {destinations[0]} but no RUN line "
                        f"installs it: add `pip install ... -r {destinations[0]}`.")
    return problems


def test_lock_pins_every_dependency_inside_its_range():
    problems = lock_problems(PYPROJECT, LOCK)
    assert problems == [], "\n".join(problems)


def test_dockerfile_installs_the_lock_on_a_cuda12_base():
    problems = dockerfile_problems(DOCKERFILE, LOCK)
    assert problems == [], "\n".join(problems)


# The checkers on broken copies: each must name the package (or line) and the fix.


def copy_of(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of `path` in tmp_path with `old` (which must occur) replaced by `new`."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: the test no longer matches the file"
    copy = tmp_path / path.name
    copy.write_text(text.replace(old, new))
    return copy


def test_bumped_pyproject_range_without_the_lock_fails(tmp_path):
    pyproject = copy_of(PYPROJECT, tmp_path, '"torch>=2.4,<2.14"', '"torch>=2.14,<2.15"')
    problems = lock_problems(pyproject, LOCK)
    assert len(problems) == 1, problems
    assert problems[0].startswith("torch: ") and "pins 2.13.0, outside" in problems[0]
    assert "'torch>=2.14,<2.15'" in problems[0] and "inside the range" in problems[0]


def test_new_pyproject_dependency_without_a_pin_fails(tmp_path):
    pyproject = copy_of(PYPROJECT, tmp_path, '"psutil>=5.9",', '"psutil>=5.9",\n    "trl>=1.0",')
    problems = lock_problems(pyproject, LOCK)
    assert len(problems) == 1, problems
    assert problems[0].startswith("trl: ") and "add trl==<version>" in problems[0]


def test_platform_marker_excludes_a_dependency_from_the_image(tmp_path):
    pyproject = copy_of(PYPROJECT, tmp_path, '"psutil>=5.9",',
                        "\"psutil>=5.9\",\n    \"pyobjc>=10; sys_platform == 'darwin'\",")
    assert lock_problems(pyproject, LOCK) == []


def test_loose_duplicate_and_local_pins(tmp_path):
    lock = copy_of(LOCK, tmp_path, "\nnumpy==2.4.6", "\nnumpy>=2\nNumPy==2.4.6")
    lock.write_text(lock.read_text().replace("\ntorch==2.13.0\n", "\ntorch==2.13.0+cu126\n"))
    problems = lock_problems(PYPROJECT, lock)
    assert len(problems) == 2, problems
    assert problems[0].startswith("numpy is pinned 2 times") and "keep one pin" in problems[0]
    assert "numpy>=2 is not an exact pin" in problems[1]
    # torch==2.13.0+cu126 is the 2.13.0 release, inside "torch>=2.4,<2.14": no problem reported.


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04", "nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04",
         "is not a CUDA 12 cudnn-devel image"),
        ("nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04", "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04",
         "is not a CUDA 12 cudnn-devel image"),
        ("download.pytorch.org/whl/cu126 -r", "download.pytorch.org/whl/cu128 -r",
         "use --extra-index-url https://download.pytorch.org/whl/cu126"),
        ("-r /tmp/requirements-gpu.lock", "-r /tmp/requirements-other.txt",
         "no RUN line installs it: add `pip install ... -r /tmp/requirements-gpu.lock`"),
        ("COPY requirements-gpu.lock", "COPY requirements.txt", "never copies requirements-gpu.lock"),
    ],
)
def test_dockerfile_checker_names_the_fix(tmp_path, old, new, expected):
    dockerfile = copy_of(DOCKERFILE, tmp_path, old, new)
    problems = dockerfile_problems(dockerfile, LOCK)
    assert len(problems) == 1 and expected in problems[0], problems


def test_dockerfile_checker_reads_continuation_lines(tmp_path):
    dockerfile = tmp_path / "Dockerfile.gpu"
    dockerfile.write_text(
        "# comment: FROM ubuntu\n"
        "FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS base\n"
        "COPY --chown=0:0 requirements-gpu.lock /opt/\n"
        "RUN pip install --upgrade pip \\\n"
        "    && pip install \\\n"
        "        --extra-index-url https://download.pytorch.org/whl/cu128 \\\n"
        "        --requirement=/opt/requirements-gpu.lock\n"
    )
    assert dockerfile_problems(dockerfile, LOCK) == []
