"""The learned-calibration store: what each real engine start measured, on disk, one JSON file
in the agent's state directory (``state_dir/measured.json``). The planner never reads it; the
caller loads the records and passes them in (agent/planner/learned.py).

Writes are atomic (a temporary file renamed over the old one), so a crash never leaves half a
file; a file that cannot be read is set aside as ``measured.json.bad`` with a warning and the
agent plans from the formulas.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent.planner.learned import Measured

log = logging.getLogger(__name__)
FILE_NAME = "measured.json"
FORMAT_VERSION = 1
# A start whose KV capacity differs from the plan by more than this share is logged.
REPORT_DIFFERENCE = 0.05


def state_dir(configured: str | None, env: Mapping[str, str] | None = None) -> Path:
    """The state directory: the setting, else systemd's $STATE_DIRECTORY (the service's
    StateDirectory=node-agent, /var/lib/node-agent), else $XDG_STATE_HOME/node-agent, else
    ~/.local/state/node-agent (install.sh --user uses the same)."""
    env = os.environ if env is None else env
    if configured:
        return Path(configured).expanduser()
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "node-agent"
    return Path(env.get("HOME") or Path.home()) / ".local" / "state" / "node-agent"


class LearnedStore:
    """Measured starts by key id; the newest measurement of a key replaces the older one."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME

    def load(self) -> dict[str, Measured]:
        """Every record, or none when the file is missing or unreadable (set aside, warned)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            records = data["records"] if data.get("version") == FORMAT_VERSION else {}
            return {k: Measured.from_dict(v) for k, v in records.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = self.path.with_name(FILE_NAME + ".bad")
            log.warning("learned store %s is unreadable (%s); moved to %s, planning from the formulas",
                        self.path, exc, bad)
            try:
                os.replace(self.path, bad)
            except OSError:
                pass
            return {}

    def record(self, measured: Measured) -> None:
        """Add one start's measurements (atomically replaces the file)."""
        records = {k: v.to_dict() for k, v in self.load().items()}
        records[measured.key.id()] = measured.to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=FILE_NAME, dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": FORMAT_VERSION, "records": records}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        error = measured.prediction_error
        if error is not None and abs(error) > REPORT_DIFFERENCE:
            log.warning("KV capacity %d tokens differs from the planned %d by %+.1f %% (%s); the next plan for "
                        "this key uses what was measured", measured.kv_tokens, measured.predicted_kv_tokens,
                        100 * error, measured.key.id())
        else:
            log.info("measured KV capacity %d tokens (planned %d) recorded in %s", measured.kv_tokens,
                     measured.predicted_kv_tokens, self.path)


def plan_inputs(settings, profile: bool = False) -> dict:
    """What every plan of this host is made with besides the model: the vLLM release it runs
    (``planner.vllm_version``, else the installed one) and, unless planning for a profile (another
    host), what earlier starts here measured."""
    from agent.backends.vllm_measured import installed_vllm_version

    use = settings.planner.use_measured and not profile
    return {"vllm_version": installed_vllm_version(),
            "measured": LearnedStore(state_dir(settings.state_dir)).load() if use else {}}
