"""sharp_fpn.cli: one-line errors, --debug for the traceback."""
import pytest

from sharp_fpn.cli import UserError, one_line, run


def _fails(error):
    def main(argv=None):
        raise error

    return main


def test_a_users_problem_is_one_line_on_stderr(capsys):
    assert run(_fails(UserError("cells.tif: 2 channels;\n  pass --channel")), ["x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cells.tif: 2 channels; pass --channel" in err


def test_an_unexpected_error_names_its_kind_and_points_at_debug(capsys):
    assert run(_fails(KeyError("MODEL.X")), ["x"]) == 1
    assert "KeyError: 'MODEL.X' (run again with --debug" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(UserError, match="boom"):
        run(_fails(UserError("boom")), ["--debug"])


def test_the_exit_status_of_a_successful_run_is_kept():
    assert run(lambda argv=None: 0, []) == 0 and run(lambda argv=None: 3, []) == 3


def test_one_line_joins_lines():
    assert one_line(ValueError("a\n   b")) == "a b"
