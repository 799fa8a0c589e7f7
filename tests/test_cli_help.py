"""What a new user meets first (issue #30): every command's --help shows each option's default
and flags as flags, `--flag value` gets one hint on every command, `info` is not cut in a
pipe, and a resumed extraction says how much was already done."""

import os
import re
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from wsi_mil.cli import app

runner = CliRunner()
COMMANDS = get_command(app).commands  # every registered command, whoever registered it


def _help(name: str) -> str:
    r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"})  # one line per option
    assert r.exit_code == 0, r.output
    return r.output


def _row(text: str, opt: str) -> str:
    """The help table's line for `opt` (an option's first name, or an argument's name)."""
    for line in text.splitlines():
        words = line.strip("│ ").lstrip("* ").split()
        if words and words[0].rstrip(".").lower() == opt.lower():
            return line
    raise AssertionError(f"{opt} not in the help:\n{text}")


def _flags(cmd):
    return [p for p in cmd.params if getattr(p, "is_flag", False)]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default_and_flags_as_flags(name):
    text = _help(name)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage
    for p in COMMANDS[name].params:
        opt = next((o for o in p.opts if o.startswith("--")), p.metavar or p.name)
        row = _row(text, opt)
        if getattr(p, "is_flag", False) and not p.secondary_opts:
            continue  # a single flag is off unless given
        assert "[default:" in row or "[required]" in row, f"{name} {opt}: no default shown\n{row}"


def test_device_help_is_the_same_on_every_command():
    texts = {}
    for name, cmd in COMMANDS.items():
        if any("--device" in p.opts for p in cmd.params):
            row = _row(_help(name), "--device")
            texts[name] = re.search(r"<str>\s+(.*?)\s+\[default: \(?[^\]]*auto", row).group(1)
    assert len(texts) >= 5 and len(set(texts.values())) == 1, texts
    assert "cuda:N" in next(iter(texts.values()))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_value_given_to_any_flag_gets_the_same_one_line_hint(name):
    flags = [o for p in _flags(COMMANDS[name]) for o in p.opts + p.secondary_opts] + ["--help"]
    for flag in flags:
        for args, written in (([flag, "true"], f"{flag} true"), ([f"{flag}=no"], f"{flag}=no")):
            r = runner.invoke(app, [name, *args])
            assert r.exit_code == 2, (args, r.output)
            hint = f"error: {flag} is a flag and takes no value: write {flag}, not {written}"
            assert r.output.strip() == hint, (args, r.output)


def test_any_value_left_over_after_a_flag_gets_the_hint_and_a_positional_does_not(tmp_path):
    r = runner.invoke(app, ["crossval", "--overwrite", "maybe"])
    assert r.output.strip().endswith("write --overwrite, not --overwrite maybe"), r.output
    r = runner.invoke(app, ["heatmap", "s.svs", "--run", "r", "--no-viewer", "please"])
    assert r.exit_code == 2 and "not --no-viewer please" in r.output, r.output
    r = runner.invoke(app, ["tile", "--overwrite", str(tmp_path / "nosuch.svs"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nosuch.svs: no such slide" in r.output and "is a flag" not in r.output


def test_info_in_a_pipe_prints_the_whole_table(tmp_path):
    from wsi_mil.synthetic import write_synthetic_slide

    name = "a_slide_with_a_name_long_enough_to_push_the_table_well_past_eighty_columns_" + "x" * 20
    write_synthetic_slide(tmp_path / f"{name}.tif", 600, 400, 0.5, seed=1)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    cmd = [sys.executable, "-m", "wsi_mil", "info", str(tmp_path / f"{name}.tif")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if name in line)
    assert "…" not in r.stdout and len(row) > 120
    for column in ("slide", "backend", "level-0 size", "levels", "downsamples", "mpp source", "objective"):
        assert column in r.stdout, (column, r.stdout)
    assert "properties" in row and row.rstrip().endswith("│")


def test_resumed_extraction_says_how_much_was_done(tmp_path, synthetic_slide, monkeypatch):
    import h5py

    from wsi_mil.formats.features import FeatureWriter

    args = ["extract", str(synthetic_slide.path), "--out", str(tmp_path), "--encoder", "resnet18"]
    args += ["--random-weights", "--target-mpp", "4.0", "--patch-size", "112", "--batch-size", "4"]
    write = FeatureWriter.write

    def killed_after_one_batch(self, start, rows):
        if start:
            raise RuntimeError("killed")
        write(self, start, rows)

    monkeypatch.setattr(FeatureWriter, "write", killed_after_one_batch)
    assert runner.invoke(app, args).exit_code == 1
    monkeypatch.undo()
    partial = next(tmp_path.rglob("*.h5.partial"))
    with h5py.File(partial) as f:
        done, total = int(f.attrs["n_done"]), len(f["coords"])
    assert 0 < done < total
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert f"{synthetic_slide.path.stem}: resuming, {done} of {total} patches already done" in r.output
    assert re.search(rf"patches\s.*\s{total}/{total}\s", r.output), r.output  # resumed rows counted
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "extract: 1 of 1 slide(s) already done" in r.output, r.output
