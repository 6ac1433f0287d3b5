"""One command-line grammar: every command's flags come from a typed config, spelled one way, each
with a help line, the model always `--checkpoint`, `--print-config` readable by `--config`, and user
errors as one line with exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from m3ae.cli import _subparsers, build_parser, main

# `m3ae demo` is being rewritten under another issue (eval/demo.py); its flags keep their own form until then.
# The flags every command that has the setting spells the same way.
SHARED = ("--checkpoint", "--batch-size", "--out-dir", "--device", "--precision", "--threads", "--data.source")
# Commands that read a trained model.
MODEL_COMMANDS = {"embed", "knn", "ood", "linear-probe", "finetune", "reconstruct", "attention", "tsne", "export",
                  "push-to-hub"}
KEBAB = re.compile(r"--[a-z0-9]+(-[a-z0-9]+)*(\.[a-z0-9]+(-[a-z0-9]+)*)*")


def _commands() -> dict[str, argparse.ArgumentParser]:
    """{"m3ae data build": parser, ...}: every command that runs (not the groups of commands)."""
    return {sub.prog: sub for sub in _subparsers(build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options `--help` lists (hidden aliases left out)."""
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _canonical(flag: str) -> str:
    return flag.lstrip("-").replace("_", "-")


def test_there_are_commands_and_each_help_parses(capsys):
    commands = _commands()
    assert {"m3ae pretrain", "m3ae knn", "m3ae tsne", "m3ae data synth", "m3ae export", "m3ae bench"} <= set(commands)
    for prog in commands:
        with pytest.raises(SystemExit) as stop:
            main([*prog.split()[1:], "--help"])
        assert stop.value.code == 0, prog
        assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_one_kebab_spelling_and_the_shared_flags_spelled_the_same_everywhere():
    for prog, parser in _commands().items():
        listed = [flag for action in _options(parser) for flag in action.option_strings]
        for flag in listed:
            assert KEBAB.fullmatch(flag) or flag == "-h", f"{prog}: {flag}"
            for shared in SHARED:  # --batch_size, --outdir-like variants of a shared flag
                assert flag == shared or _canonical(flag).replace("-", "") != _canonical(shared).replace("-", ""), \
                    f"{prog}: {flag} instead of {shared}"
        assert not [a for a in parser._actions if not a.option_strings], f"{prog} takes a positional argument"
        if prog.split()[-1] in MODEL_COMMANDS:
            assert "--checkpoint" in listed, prog


# One spelling per concept (docs/ARCHITECTURE.md, "The command line"): the canonical flag of each
# concept, and the config fields that set it, named by their last part. Fields of the data section
# are the source's own (data.seed shuffles it, data.columns.image names a column): listed by full
# path where they are one of these concepts.
CONCEPTS = {
    "--batch-size": {"batch_size"},
    "--precision": {"precision", "dtype"},
    "--preset": {"preset"},
    "--seed": {"seed"},
    "--threads": {"threads"},
    "--device": {"device"},
    "--max-steps": {"max_steps"},
    "--checkpoint": {"checkpoint"},
    "--out": {"out", "out_prefix", "out_file", "output"},  # the file (or file-name prefix) a command writes
    "--out-dir": {"out_dir", "output_dir"},  # the directory a command writes
    "--image": {"image", "images"},
    "--caption": {"caption", "captions"},
    "--train-data": {"data.eval_train_source"},
    "--val-data": {"data.eval_val_source"},
    "--val-fraction": {"data.eval_val_fraction", "val_fraction"},
    "--data.columns.image": {"data.columns.image"},  # open_clip's --csv-img-key: a hidden alias
    "--data.columns.caption": {"data.columns.caption"},
    "--data.columns.separator": {"data.columns.separator"},
}


def _concept(dotted: str) -> str | None:
    """The canonical flag of the concept the config field `dotted` sets, or None."""
    keys = (dotted,) if dotted.startswith("data.") else (dotted, dotted.rsplit(".", 1)[-1])
    return next((flag for flag, names in CONCEPTS.items() if names & set(keys)), None)


def test_each_concept_is_listed_under_its_one_spelling_in_every_command():
    seen = set()
    for prog, parser in _commands().items():
        for action in _options(parser):
            if not action.dest.startswith("config_overrides:"):
                continue
            canonical = _concept(action.dest.split(":", 1)[1])
            if canonical is not None:
                assert action.option_strings == [canonical], f"{prog}: {action.option_strings} instead of {canonical}"
                seen.add(canonical)
    assert seen == set(CONCEPTS), f"concepts no command has (a stale table?): {set(CONCEPTS) - seen}"


# old spelling -> the canonical one, each still accepted (not listed) for one release
OLD_SPELLINGS = [
    (["pretrain"], "--train.batch-size", "--batch-size", "8"),
    (["pretrain"], "--train.precision", "--precision", "fp32"),
    (["pretrain"], "--model.preset", "--preset", "small"),
    (["pretrain"], "--train.seed", "--seed", "3"),
    (["pretrain"], "--train.max-steps", "--max-steps", "3"),
    (["bench"], "--dtype", "--precision", "fp32"),
    (["tsne", "--checkpoint", "m"], "--data.eval-val-fraction", "--val-fraction", "0.25"),
    (["knn", "--checkpoint", "m"], "--csv-img-key", "--data.columns.image", "filepath"),
    (["attention", "--checkpoint", "m", "--image", "a.png", "--caption", "a"], "--out-prefix", "--out", "x/att"),
    (["reconstruct", "--checkpoint", "m", "--caption", "a", "b"], "--images", "--image", "a.png b.png"),
    (["reconstruct", "--checkpoint", "m", "--image", "a.png"], "--captions", "--caption", "a b"),
]


@pytest.mark.parametrize("command, old, new, value", OLD_SPELLINGS, ids=[case[1] for case in OLD_SPELLINGS])
def test_an_old_spelling_is_a_hidden_alias_of_the_canonical_one(command, old, new, value, capsys):
    printed = []
    for flag in (old, new):
        assert main([*command, flag, *value.split(), "--print-config"]) == 0, flag
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    assert old not in _options_listed(_commands()[f"m3ae {command[0]}"])


def _options_listed(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in _options(parser) for flag in action.option_strings]


def test_a_typo_of_an_old_spelling_points_to_the_canonical_flag(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--train.batch-sise", "8"])
    assert "(did you mean --batch-size?)" in capsys.readouterr().err


def test_every_option_has_its_own_help_line_and_config_fields_show_their_default():
    for prog, parser in _commands().items():
        for action in _options(parser):
            flag = action.option_strings[-1]
            assert action.help and action.help.strip(), f"{prog} {flag}: no help"
            if action.dest.startswith("config_overrides:"):
                field = action.dest.split(":", 1)[1].rsplit(".", 1)[-1]
                # the fallback when a field has no comment is its own name: not a help line
                assert not action.help.startswith(f"{field.replace('_', ' ')} (default"), f"{prog} {flag}"
                assert re.search(r"\((default: .+|required)\)$", action.help), f"{prog} {flag}: {action.help}"


def test_the_underscore_spelling_is_a_hidden_alias(capsys):
    assert main(["knn", "--checkpoint", "m", "--batch_size", "3", "--data.eval_val_fraction", "0.5",
                 "--print-config"]) == 0
    kebab = capsys.readouterr().out
    assert main(["knn", "--checkpoint", "m", "--batch-size", "3", "--data.eval-val-fraction", "0.5",
                 "--print-config"]) == 0
    assert capsys.readouterr().out == kebab and "batch_size: 3" in kebab and "eval_val_fraction: 0.5" in kebab


def _required_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [arg for action in _options(parser) if (action.help or "").endswith("(required)")
            for arg in (action.option_strings[0], "x")]


def test_print_config_is_yaml_that_config_reads_back(tmp_path, capsys):
    checked = 0
    for prog, parser in _commands().items():
        if not any("--print-config" in a.option_strings for a in parser._actions):
            continue
        argv = [*prog.split()[1:], *_required_flags(parser)]
        assert main([*argv, "--print-config"]) == 0, prog
        printed = capsys.readouterr().out
        path = tmp_path / f"{prog.replace(' ', '_')}.yaml"
        path.write_text(printed)
        assert main([*prog.split()[1:], "--config", str(path), "--print-config"]) == 0, prog
        assert capsys.readouterr().out == printed, prog
        checked += 1
    assert checked == len(_commands()), "a command without --print-config"


def test_list_fields_take_several_values_repeats_or_one_yaml_list(capsys):
    import yaml

    def printed(*argv):
        assert main(["tsne", *argv, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)["checkpoint"]

    assert printed("--checkpoint", "A=a", "b") == printed("--checkpoint", "A=a", "--checkpoint", "b") == ["A=a", "b"]
    assert printed("--checkpoint", "[A=a, b]") == ["A=a", "b"]


def test_a_bare_boolean_flag_turns_it_on(capsys):
    import yaml

    assert main(["push-to-hub", "--checkpoint", "m", "--repo-id", "me/m", "--private", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["private"] is True
    assert main(["push-to-hub", "--checkpoint", "m", "--repo-id", "me/m", "--private", "false", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["private"] is False
    # a setting that may also be null (decided from others) too
    assert main(["linear-probe", "--checkpoint", "m", "--cached", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["cached"] is True


def _one_error_line(err: str, kind: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line or ": config error: " in line]
    assert len(lines) == 1, err
    assert f": {kind}: " in lines[0], lines[0]
    return lines[0]


# per family: a typo'd flag, a missing path, a bad value
FAMILIES = {
    "pretrain": (["pretrain", "--train.batch-sise", "8"],
                 ["pretrain", "--config", "{tmp}/no-such-recipe.yaml"],
                 ["pretrain", "--train.batch-size", "many"]),
    "transfer": (["knn", "--checkpoint", "{tmp}/m", "--temprature", "0.1"],
                 ["knn", "--checkpoint", "{tmp}/no-such-run"],
                 ["knn", "--checkpoint", "{tmp}/m", "--k", "many"]),
    "viz": (["reconstruct", "--checkpoint", "{tmp}/m", "--imag", "a.png"],
            ["reconstruct", "--checkpoint", "{tmp}/no-such-run", "--image", "a.png"],
            ["attention", "--checkpoint", "{tmp}/m", "--image", "a.png", "--caption", "a", "--layer", "middle"]),
    "data": (["data", "inspect", "--data.sorce", "x"],
             ["data", "inspect", "--data.source", "{tmp}/no-such.tar"],
             ["data", "synth", "--out-dir", "{tmp}/e", "--shard-size", "ten"]),
    "interop": (["export", "--checkpoint", "{tmp}/m", "--out-dir", "{tmp}/o", "--fromat", "hf"],
                ["export", "--checkpoint", "{tmp}/no-such-run", "--out-dir", "{tmp}/o"],
                ["export", "--checkpoint", "{tmp}/m", "--out-dir", "{tmp}/o", "--format", "onnx"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_user_errors_are_one_line_and_exit_2(family, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("M3AE_DEBUG", raising=False)
    typo, missing, bad = ([arg.format(tmp=tmp_path) for arg in argv] for argv in FAMILIES[family])
    with pytest.raises(SystemExit) as stop:
        main(typo)
    assert stop.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "error")
    # the command named, and the flag meant
    assert line.startswith(f"m3ae {' '.join(typo[:2]) if family == 'data' else typo[0]}: error: unrecognized arguments: "
                           f"{typo[-2]} ") and "(did you mean --" in line, line

    assert main(missing) == 2
    line = _one_error_line(capsys.readouterr().err, "config error" if family == "pretrain" else "error")
    assert "no-such" in line

    assert main(bad) == 2
    line = _one_error_line(capsys.readouterr().err, "config error")
    assert bad[-2].lstrip("-").replace("-", "_").split(".")[-1] in line and repr(bad[-1]) in line



def test_a_model_given_positionally_points_to_checkpoint(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "runs/x", "--out-dir", "out"])
    assert stop.value.code == 2
    assert "m3ae export: error: unrecognized arguments: runs/x (did you mean --checkpoint runs/x?)" in \
        capsys.readouterr().err


@dataclasses.dataclass
class _Base:
    # Said above the field,
    # over two lines.
    above: int = 1
    beside: int = 2  # said beside it
    # said above the next field, not below this one
    both: int = 3  # and beside


@dataclasses.dataclass
class _Child(_Base):
    beside: int = 4  # the subclass's own words
    bare: int = 5


def test_field_help_is_the_comment_above_and_beside_each_field_inherited_too():
    from m3ae.config import field_help

    assert field_help(_Child) == {
        "above": "Said above the field, over two lines.",
        "beside": "the subclass's own words",
        "both": "said above the next field, not below this one and beside",
    }
    # a probe config: the recipe's comment block above `recipe` is not `batch_size`'s, and the
    # fields FinetuneConfig inherits keep their help
    from m3ae.eval.probe import FinetuneConfig, LinearProbeConfig

    assert field_help(LinearProbeConfig)["batch_size"] == "global"
    assert field_help(FinetuneConfig)["checkpoint"] == field_help(LinearProbeConfig)["checkpoint"] != ""
