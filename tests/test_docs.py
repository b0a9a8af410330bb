"""The docs tell the truth about the tool: every command and option they show exists, the reference
lists every option, and the architecture's layout is the tree's."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from bench.__main__ import main as bench_main
from bench.accuracy import main as accuracy_main
from clothing.__main__ import cli as clothing_cli
from sweep.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Options of the other programs the docs show (mlflow, initdb, pytest), which are not ours to check.
OTHER_TOOLS_OPTIONS = {
    "--app-name", "--host", "--port", "--backend-store-uri", "--artifacts-destination",  # mlflow server / ui
    "--env-manager",  # mlflow models serve
    "--auth", "--pwfile",  # initdb
    "--hypothesis-profile", "--dist",  # pytest with Hypothesis, pytest-xdist
    "--no-deps", "--no-binary",  # pip download
}  # fmt: skip
GROUPS = {"sweep": cli, "clothing": clothing_cli}
BENCH_COMMANDS = (bench_main, accuracy_main)


def options_of(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", []) + getattr(param, "secondary_opts", []))
    return names


def code_in(text: str) -> list[str]:
    """Every command line the text shows: fenced blocks' lines (continuations joined, comments cut)
    and inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def shown_commands() -> list[tuple[str, str, str, list[str]]]:
    """(doc, group, command, options) of every `python -m sweep|clothing COMMAND ...` the docs show."""
    found = []
    for doc in DOCS:
        for line in code_in(doc.read_text(encoding="utf-8")):
            for group, command, rest in re.findall(r"python -m (sweep|clothing) ([a-z]+)((?:\s+[^|;&]*)?)", line):
                found.append((doc.name, group, command, re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", rest)))
    return found


def test_the_docs_show_commands():
    commands = {(group, command) for _, group, command, _ in shown_commands()}
    assert {("sweep", "run"), ("sweep", "best"), ("sweep", "trials"), ("sweep", "predict")} <= commands


@pytest.mark.parametrize("doc, group, command, options", shown_commands())
def test_every_command_line_the_docs_show_exists(doc, group, command, options):
    assert command in GROUPS[group].commands, f"{doc}: python -m {group} {command}"
    known = options_of(GROUPS[group].commands[command])
    unknown = [o for o in options if o.startswith("--") and o not in known]
    assert not unknown, f"{doc}: python -m {group} {command} has no option {unknown}"


def test_every_option_the_docs_name_is_one_of_ours_or_another_tools():
    ours = set().union(*(options_of(c) for g in GROUPS.values() for c in g.commands.values())) | {"--version"}
    ours |= set().union(*map(options_of, BENCH_COMMANDS))  # `python -m bench ...`, which the benchmarks name
    for doc in DOCS:
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", doc.read_text(encoding="utf-8")))
        assert named <= ours | OTHER_TOOLS_OPTIONS, f"{doc.name} names {sorted(named - ours - OTHER_TOOLS_OPTIONS)}"


def test_the_reference_lists_every_option_of_every_command():
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in reference, f"docs/reference.md does not list {name} {option}"


def test_every_make_target_the_docs_show_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for doc in DOCS:
        for line in code_in(doc.read_text(encoding="utf-8")):
            for target in re.findall(r"(?<![\w-])make ([a-z][a-z-]*)", line):
                assert target in targets, f"{doc.name}: make {target}"


def test_the_architecture_layout_names_every_module_and_only_those():
    layout = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S)[1]
    for package in ("clothing", "sweep"):
        section = re.search(rf"^{package}/.*?\n((?:  .*\n)+)", layout, re.M)[1]
        listed = set(re.findall(r"^  (\w+)", section, re.M)) | {"__init__"}
        modules = {p.stem for p in (ROOT / package).glob("*.py")}
        # "data ... ; holdout: ..." names a second module in one line
        listed |= set(re.findall(r";\s*(\w+):", section)) & modules
        assert listed == modules, (
            f"{package}/: listed but missing {listed - modules}, missing from the layout {modules - listed}"
        )


def test_every_file_the_docs_link_to_exists():
    """A picture or page the README or docs/ links to (a relative link) is in the tree."""
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s#]+)[^)]*\)", doc.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not in the tree"
