"""python -m minigrpo.train as a user drives it: run folders the file system cannot hold, and the table
of a long run."""

from __future__ import annotations

import re

import pytest
import yaml

from minigrpo.metrics_table import format_header, format_row, table_columns
from minigrpo.train import main


def train_in_process(tmp_path, run: dict, capsys) -> tuple[int, str]:
    """`python -m minigrpo.train` on the defaults with `run` settings; (exit status, stderr)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"device": "cpu", **run}, "train": {"steps": 1}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path)])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("key", ["run.name", "run.output_dir"])
def test_a_folder_name_longer_than_the_file_system_takes_is_one_error_line(tmp_path, capsys, key):
    """A 300-byte run.name (or output_dir folder) was an OSError traceback (File name too long) from the
    run folder's lock; now one `error:` line naming the key and the 255-byte limit, and nothing is made."""
    long = "x" * 300
    run = {"name": long} if key == "run.name" else {"name": "r", "output_dir": str(tmp_path / long / "runs")}
    run.setdefault("output_dir", str(tmp_path / "runs"))
    code, err = train_in_process(tmp_path, run, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: the folder name 'xxx"), err
    assert "is 300 bytes long, more than the 255" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_an_output_dir_under_an_unknown_home_folder_is_one_error_line(tmp_path, capsys):
    """run.output_dir=~nosuchuser/runs was a RuntimeError traceback (Could not determine home directory)."""
    code, err = train_in_process(tmp_path, {"output_dir": "~no_such_user_here/runs"}, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        "error: run.output_dir='~no_such_user_here/runs': Could not determine home directory. "
        "(write the folder out in full)"
    )


@pytest.mark.parametrize("step", [999_999, 1_000_000, 1_000_001, 9_999_999])
def test_steps_of_a_long_run_print_in_full_and_aligned(step):
    """A 6-wide step column printed steps 1000000 and 1000001 both as "1.0M": the rows of a long run
    could not be told apart. Every step below 10 million prints in full, under its header."""
    cols = table_columns(["step", "reward", "loss"])
    header, row = format_header(cols), format_row(cols, {"step": float(step), "reward": 0.5, "loss": -0.25})
    assert row.split() == [str(step), "0.500", "-0.25"]
    ends = lambda text: [m.end() for m in re.finditer(r"\S+", text)]
    assert len(row) == len(header) and ends(row) == ends(header), (header, row)
