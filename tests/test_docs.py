"""The README and docs/ stay true to the code.

- every relative link resolves (a file, and a heading for ``#anchor``);
- every ``--flag`` in a command (a fenced code block, or inline code that starts with the
  command) exists in the ``--help`` of that command: a flow's subcommand (``run``, ``resume``,
  ``argo-workflows create``...), the trainer, ``training.generate``, a benchmark script,
  ``deepspeed``; a ``--flag`` alone in inline code exists in one of those;
- every ``benchmarks/...``, ``flows/...``, ``training/...`` (etc.) path named exists.

The checks are plain functions; the first tests feed them broken text to show they catch it.

    pytest tests/test_docs.py
"""

from __future__ import annotations

import functools
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, flow_env, needs_chromium, python_env, run_bounded

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:benchmarks|flows|training|ds_configs|environments|tests|gpu_profile|docs)"
                       r"/[\w./-]*[\w])")
# A flow's subcommands that take flags of their own (two words: the group, then the command).
FLOW_SUBCOMMANDS = {"run", "resume", "show", "check", "argo-workflows", "card", "kubernetes", "step-functions"}
GROUPS = {"argo-workflows", "card", "kubernetes", "step-functions"}
# Always known to the inline check, besides the commands the docs show.
CORE_COMMANDS = [("flows/dolly_flow.py",), ("flows/dolly_flow.py", "run"), ("flows/dolly_sweep_flow.py", "run"),
                 ("flows/dolly_multinode_flow.py", "run"), ("-m", "training.trainer"), ("-m", "training.generate")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings (repeated headings get -1, -2, as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    outside_code = FENCE.sub("", markdown)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", outside_code, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path, markdown: str) -> list[str]:
    """Relative links of ``page`` whose file or heading does not exist."""
    problems = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link {target!r}: {path} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{page.name}: link {target!r}: no heading #{anchor} in {file.name}")
    return problems


def missing_paths(page_name: str, markdown: str) -> list[str]:
    """Repository paths named anywhere on the page (``benchmarks/x.py``) that do not exist."""
    return [f"{page_name}: {path} does not exist" for path in sorted(set(REPO_PATH.findall(markdown)))
            if not (REPO / path).exists()]


def commands(markdown: str) -> list[str]:
    """The shell commands of the page: fenced code lines (continuations joined) and inline
    code that starts with python, deepspeed or pytest."""
    found = []
    for block in FENCE.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            found += [part.strip() for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0])]
    for span in INLINE.findall(FENCE.sub("", markdown)):
        if re.match(r"(python3? |deepspeed |pytest)", span):
            found.append(span)
    return [command for command in found if command]


def help_for(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """What to check in one command: [(the help to read, the flags it must hold)]; [] for a
    command that is not ours (pip, kubectl, docker...)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in ("time", "env", "sudo")):
        words = words[1:]
    if not words:
        return []
    if words[0] == "pytest":
        return [(("-m", "pytest"), _flags(words[1:]))]
    if words[0] == "deepspeed" and "training.trainer" in words:
        cut = words.index("training.trainer")
        return [(("deepspeed",), _flags(words[1:cut])),
                (("-m", "training.trainer"), _flags(words[cut + 1:]))]
    if words[0] not in ("python", "python3") or len(words) < 2:
        return []
    if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] in ("training", "benchmarks", "pytest"):
        return [(("-m", words[2]), _flags(words[3:]))]
    script = words[1]
    if script.startswith("benchmarks/") and script.endswith(".py"):
        return [((script,), _flags(words[2:]))]
    if not (script.startswith("flows/") and script.endswith(".py")):
        return []
    rest = words[2:]
    at = next((i for i, w in enumerate(rest) if w in FLOW_SUBCOMMANDS), None)
    if at is None:
        return [((script,), _flags(rest))]
    sub = rest[at:at + 2] if rest[at] in GROUPS else rest[at:at + 1]
    return [((script,), _flags(rest[:at])), ((script, *sub), _flags(rest[at + len(sub):]))]


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if FLAG.fullmatch(w.split("=")[0])]


@functools.cache
def help_text(key: tuple[str, ...]) -> str | None:
    """``--help`` of one command, e.g. ("flows/dolly_flow.py", "run") or ("-m", "training.trainer");
    None when it fails (a script or subcommand that does not exist)."""
    if key == ("deepspeed",):
        argv = [str(Path(sys.executable).parent / "deepspeed"), "--help"]
    else:
        argv = [sys.executable, *key, "--help"]
    result = run_bounded(argv, cwd=REPO, env=python_env(), timeout=180)
    return result.stdout if result.returncode == 0 else None


def in_help(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def unknown_flags(page_name: str, markdown: str) -> list[str]:
    """Flags shown with a command that its --help lacks, and flags in inline code that no
    command of ours has."""
    problems = []
    keys = list(CORE_COMMANDS)
    for command in commands(markdown):
        for key, flags in help_for(command):
            text = help_text(key)
            if text is None:
                problems.append(f"{page_name}: `{' '.join(key)} --help` fails (in: {command})")
                continue
            keys.append(key)
            for flag in flags:
                if not in_help(flag, text):
                    problems.append(f"{page_name}: {flag} is not in `{' '.join(key)} --help` (in: {command})")
    everything = "\n".join(help_text(key) or "" for key in dict.fromkeys(keys))
    for span in INLINE.findall(FENCE.sub("", markdown)):
        if re.match(r"(python3? |deepspeed |pytest)", span):
            continue  # checked above, with its command
        problems += [f"{page_name}: {flag} (in `{span}`) is in no command's --help"
                     for flag in FLAG.findall(span) if not in_help(flag, everything)]
    return problems


# The checks catch what they are for: each broken text below is reported.

def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Checkpoints in S3\n")
    page = tmp_path / "page.md"
    text = ("[ok](other.md) [ok](other.md#checkpoints-in-s3) [ok](#a-heading) [web](https://example.com/x)\n"
            "# A heading\n[gone](missing.md) [no anchor](other.md#resume) [self](#nowhere)\n"
            "```\n[not a link in code](nothing.md)\n```\n")
    page.write_text(text)
    assert broken_links(page, text) == [
        "page.md: link 'missing.md': missing.md does not exist",
        "page.md: link 'other.md#resume': no heading #resume in other.md",
        "page.md: link '#nowhere': no heading #nowhere in page.md",
    ]


def test_a_flag_missing_from_its_commands_help_is_reported():
    text = ("```bash\npython flows/dolly_flow.py run --batch-size 4 --batch_size 4\n"
            "python -m training.trainer --per_device_train_batch_size 4 \\\n    --no_such_flag 1\n```\n"
            "Set `--learning-rate` or `--made-up-flag`; `python -m training.generate --run latest --temperature 1`.\n")
    assert unknown_flags("page.md", text) == [
        "page.md: --batch_size is not in `flows/dolly_flow.py run --help` (in: python flows/dolly_flow.py run "
        "--batch-size 4 --batch_size 4)",
        "page.md: --no_such_flag is not in `-m training.trainer --help` (in: python -m training.trainer "
        "--per_device_train_batch_size 4      --no_such_flag 1)",
        "page.md: --temperature is not in `-m training.generate --help` (in: python -m training.generate "
        "--run latest --temperature 1)",
        "page.md: --made-up-flag (in `--made-up-flag`) is in no command's --help",
    ]


def test_flags_are_checked_against_the_flow_subcommand_they_follow():
    assert help_for("python flows/dolly_flow.py --environment=pypi run --with kubernetes --epochs 2") == [
        (("flows/dolly_flow.py",), ["--environment"]), (("flows/dolly_flow.py", "run"), ["--with", "--epochs"])]
    assert help_for("python flows/dolly_flow.py argo-workflows create --max-workers 4") == [
        (("flows/dolly_flow.py",), []), (("flows/dolly_flow.py", "argo-workflows", "create"), ["--max-workers"])]
    assert help_for("pip install --index-url https://x torch") == []


def test_a_missing_path_is_reported():
    text = "See benchmarks/gpu_check.sh, flows/configs/<name>.json and benchmarks/no_such_benchmark.py."
    assert missing_paths("page.md", text) == ["page.md: benchmarks/no_such_benchmark.py does not exist"]


# The docs themselves.

def test_the_docs_exist_and_the_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "python flows/dolly_flow.py run" in first_screen and "pytest" in first_screen
    assert len(DOCS) > 5  # the reference lives in docs/


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_paths_and_flags_of_the_docs_hold(page):
    text = page.read_text()
    name = str(page.relative_to(REPO))
    problems = broken_links(page, text) + missing_paths(name, text) + unknown_flags(name, text)
    assert not problems, "\n".join(problems)


@needs_chromium
def test_the_readme_pictures_can_be_taken_again_from_a_run(tiny_run, flow_home, tmp_path):
    """`python benchmarks/card_pictures.py` on a finished run: both cards as PNGs of a real page."""
    run, _ = tiny_run
    result = run_bounded([sys.executable, str(REPO / "benchmarks" / "card_pictures.py"), "--run", run.pathspec,
                          "--out", str(tmp_path)], cwd=flow_home, env=flow_env(flow_home), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in ("training-card.png", "gpu-profile-card.png"):
        picture = (tmp_path / name).read_bytes()
        assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 20_000, name  # a blank page is a few KB
    # The README shows pictures that exist (taken the same way from the default run).
    assert {"training-card.png", "gpu-profile-card.png"} <= {p.name for p in (REPO / "docs" / "images").glob("*.png")}
