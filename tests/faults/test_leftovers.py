"""Nothing left behind after a kill, whatever the moment (issue 27): the real CLI in a subprocess
SIGKILLs itself at an injected moment, and the rerun of the same command leaves only the outputs."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import assert_clean_error, run_cli

HARNESS = r'''
import os, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if os.environ["DOGTL_TEST_KILL"] == "after-history-written":
    from dogtl.head import train

    write = train.write_csv_atomic

    def write_then_die(frame, path, **kwargs):  # the temporary history is written, not renamed
        write(frame, path, **kwargs)
        die()
    train.write_csv_atomic = write_then_die
else:  # "before-progress-removed": the model is renamed into place, its .partial not removed yet
    from dogtl.finetuning import checkpoints

    remove = checkpoints.Checkpoints.remove

    def die_if_finished(self):
        if self.folder.with_suffix("").exists():
            die()
        remove(self)
    checkpoints.Checkpoints.remove = die_if_finished
from dogtl.cli import app
app(sys.argv[1:], prog_name="dogtl")
'''


def _killed(tmp_path, kill: str, *args) -> int:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    env = dict(os.environ, DOGTL_TEST_KILL=kill, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, str(harness), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr
    return r


def _names(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_train_head_killed_before_renaming_its_history_leaves_nothing_after_the_rerun(small_cache, tmp_path):
    """Found by benchmarks/faults.py: `h.tmp-PID.history.csv` stayed beside the rerun's model."""
    out = tmp_path / "models" / "h.keras"
    args = ["train-head", "--cache", small_cache, "--out", out, "--epochs", 2, "--hidden", 8]
    killed = _killed(tmp_path, "after-history-written", *args)
    left = _names(out.parent)
    assert "h.keras.lock" in left and any(n.startswith("h.tmp-") and n.endswith(".history.csv") for n in left), left
    assert "h.keras" not in left, killed.stderr

    rerun = run_cli(*args)
    assert rerun.exit_code == 0, rerun.output
    assert _names(out.parent) == ["h.history.csv", "h.json", "h.keras", "h.png"]


def test_finetune_killed_before_removing_its_checkpoints_leaves_nothing_after_the_rerun(stage3, tmp_path):
    """The model is in place; the rerun says so (it exists) and removes the checkpoints folder and
    the lock the killed run left."""
    out = tmp_path / "ft.keras"
    args = ["finetune", "--data", stage3.data, "--head", stage3.head, "--weights", stage3.weights, "--out", out,
            "--epochs", 1, "--batch-size", 8, "--trainable-blocks", 1]
    _killed(tmp_path, "before-progress-removed", *args)
    assert {"ft.keras", "ft.keras.lock", "ft.keras.partial"} <= set(_names(tmp_path))
    model = out.read_bytes()

    assert_clean_error(run_cli(*args), "ft.keras exists: pass --force")
    assert [n for n in _names(tmp_path) if n.startswith("ft.")] == ["ft.history.csv", "ft.json", "ft.keras", "ft.png"]
    assert out.read_bytes() == model
