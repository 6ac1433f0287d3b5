"""Every `m3ae ...` command the docs show runs as written: each one in README.md, docs/*.md and the
scripts (code blocks and inline code) is parsed by the real command line, must use only the
spellings `--help` lists (not an old one kept as a hidden alias), and is run with `--print-config`
(or as written, for `--help`), which checks every value without doing the work."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from m3ae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "scripts").glob("*.sh"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
INLINE = re.compile(r"`((?:\S*/)?m3ae [a-z][^`]*)`")
SHELL = set("();<>|&")
WRAPPERS = {"$", "srun", "exec", "time", "nohup", "then", "do"}  # `$`: a shell prompt
# other tools' spellings, accepted (and shown where the docs explain them), never listed in --help
OTHER_TOOLS = {"--csv-img-key", "--csv-caption-key", "--csv-separator"}


def _argv(line: str) -> list[str] | None:
    """The arguments after `m3ae` (or `python -m m3ae`, `torchrun ... -m m3ae.cli`) on a shell line,
    cut at the first shell operator; None where the line runs no m3ae command."""
    line = re.sub(r"(?<!\S)\d+>", ">", line)  # `2>&1`, `2> err`: the descriptor is no argument
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line
        return None
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        command = (word == "m3ae" or word.endswith("/m3ae")) and (
            not i or set(before) <= SHELL or before in WRAPPERS or re.match(r"^\w+=", before))
        if command or (before == "-m" and word in ("m3ae", "m3ae.cli")):
            rest = words[i + 1:]
            return rest[:next((j for j, w in enumerate(rest) if set(w) <= SHELL), len(rest))]
    return None


def _where(path: Path, argv: list[str]) -> str:
    return f"{path.relative_to(ROOT)}: m3ae {' '.join(argv)}"


def _shown(kind: str) -> list[tuple[str, list[str]]]:
    """("file: m3ae ...", argv) of every command line in shell code blocks and scripts ("block"), or
    of every inline code span that starts with `m3ae COMMAND` ("inline": table cells and prose,
    with placeholders and `[optional]` parts, checked for their command and flags only)."""
    out = []
    for path in FILES:
        text = path.read_text()
        if kind == "block":
            blocks = [text] if path.suffix == ".sh" else [b for lang, b in FENCE.findall(text) if lang in SHELL_FENCES]
            lines = [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
        else:
            lines = INLINE.findall(FENCE.sub("", text)) if path.suffix == ".md" else []
        for line in lines:
            argv = _argv(re.sub(r"\\\||\[|\]", " ", line) if kind == "inline" else line)
            # `m3ae COMMAND --help`: a placeholder; `m3ae pretrain: error: ...`: output quoted
            if not argv or argv[0].isupper() or argv[0].endswith(":"):
                continue
            # `m3ae data …`: "the rest"; `${ARGS:-}` (scripts): an unset variable's empty expansion
            argv = [w for w in argv if not w.endswith(("...", "…")) and not re.fullmatch(r"\$\{\w+:-\}", w)]
            out.append((_where(path, argv), argv))
    return out


BLOCKS, INLINE_SPANS = _shown("block"), _shown("inline")


def test_the_docs_show_commands_of_every_family():
    shown = {argv[0] for _, argv in BLOCKS + INLINE_SPANS}
    assert {"pretrain", "linear-probe", "knn", "embed", "reconstruct", "attention", "tsne", "export", "data",
            "demo", "bench"} <= shown, shown


def _command(argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser `argv` names, by its leading words."""
    parser = build_parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        assert word in subs[0].choices, f"no command {word!r} (known: {sorted(subs[0].choices)})"
        parser = subs[0].choices[word]
    return parser


def _check_spellings(where: str, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    listed = {flag for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings}
    for word in argv:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        assert flag in parser._option_string_actions, f"{where}: {parser.prog} has no {flag}"
        assert flag in listed or flag in OTHER_TOOLS, \
            f"{where}: {flag} is an old spelling kept as a hidden alias; write the one --help lists"


@pytest.mark.parametrize("where, argv", INLINE_SPANS, ids=[where for where, _ in INLINE_SPANS])
def test_a_command_named_in_the_text_exists_with_its_flags(where, argv):
    _check_spellings(where, _command(argv), argv)


@pytest.mark.parametrize("where, argv", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_command_shown_in_a_code_block_parses_and_runs_with_print_config(where, argv, tmp_path, monkeypatch,
                                                                          capsys):
    parser = _command(argv)
    _check_spellings(where, parser, argv)
    monkeypatch.chdir(tmp_path)  # nothing the command might write lands in the checkout
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0, where
        return
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {capsys.readouterr().err.strip()}")
    assert not unknown, f"{where}: unknown arguments {unknown}"
    assert main([*argv, "--print-config"]) == 0, f"{where}: {capsys.readouterr().err.strip()}"
