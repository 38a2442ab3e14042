"""Where the learned store (measured.json) lives: the setting, systemd's STATE_DIRECTORY,
$XDG_STATE_HOME/node-agent, else ~/.local/state/node-agent; and the test session's own
isolation (tests/conftest.py) keeps every test out of the developer's ~/.local/state."""

from __future__ import annotations

import os
from pathlib import Path

from agent.learned_store import state_dir


def test_state_dir_precedence():
    env = {"HOME": "/home/u", "XDG_STATE_HOME": "/x/state", "STATE_DIRECTORY": "/var/lib/node-agent:/other"}
    assert state_dir("~/mine", env) == Path("~/mine").expanduser()
    assert state_dir(None, env) == Path("/var/lib/node-agent")
    assert state_dir(None, {k: v for k, v in env.items() if k != "STATE_DIRECTORY"}) == Path("/x/state/node-agent")
    assert state_dir(None, {"HOME": "/home/u"}) == Path("/home/u/.local/state/node-agent")


def test_the_session_state_dir_is_a_temporary_one():
    # tests/conftest.py points HOME and XDG_STATE_HOME into a temporary directory before collection.
    home = Path(os.environ["HOME"])
    assert home.name.startswith("node-agent-tests-home-")
    where = state_dir(None)
    assert where == Path(os.environ["XDG_STATE_HOME"]) / "node-agent" and home in where.parents
    assert "STATE_DIRECTORY" not in os.environ
