"""The ``miniray`` command's dispatch (the commands themselves are tested where they live)."""

from __future__ import annotations

from miniray.cli import main


def test_info_lists_the_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "local" in out and "inline" in out


def test_unknown_command_prints_usage_and_fails(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0
