"""The resumable state of a fine-tuning run, in `<out>.partial/`.

After each finished epoch the folder holds that epoch's model (with its optimizer state),
the best model so far, and `state.json`, written last and atomically: a kill at any moment
leaves the state of the last finished epoch, which the same command resumes from. The
state names the settings, head and cache it belongs to, so another run's is refused, and
the content hash of each checkpoint it keeps, so one damaged on disk is never trained on.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dogtl.core.early_stopping import EarlyStopping
from dogtl.core.errors import DamagedError, DogtlError
from dogtl.core.files import atomic_path, file_sha256, write_json_atomic
from dogtl.core.temporaries import progress_folder

STATE = "state.json"


@dataclass
class RunState:
    """What a run has done so far; `to_json`/`from_json` round-trip it through state.json."""

    epoch: int  # epochs finished
    before: dict  # scores of the untouched head (epoch 0)
    best: dict  # scores of the best model so far
    best_file: str  # its checkpoint in the folder
    last_file: str  # the last finished epoch's checkpoint, to resume from
    trainable_layers: list[str]
    head_difference: float  # max |p(images) - p(cached features)| on clean validation images
    stopping: EarlyStopping  # its best epoch is the best model's (0: the head itself)
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    hashes: dict = field(default_factory=dict)  # SHA-256 of the kept checkpoints, checked on loading
    random_state: list = field(default_factory=list)  # the last checkpoint's dropout generators

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> "RunState":
        return cls(**{**saved, "stopping": EarlyStopping(**saved["stopping"])})


def random_state(model) -> list:
    """The states of the model's random generators (its dropout layers' seed generators), which a
    .keras file does not hold: a resumed run restores them, so it draws the dropout masks the
    uninterrupted run would have drawn (found by benchmarks/faults.py: resumed epochs differed)."""
    return [np.asarray(v).tolist() for v in model.variables if v.path.endswith("seed_generator_state")]


def restore_random_state(model, state: list) -> None:
    generators = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    if len(state) == len(generators):  # a state.json of an older dogtl has none: left as built
        for v, value in zip(generators, state):
            v.assign(np.asarray(value, dtype=v.dtype))


@dataclass(frozen=True)
class Checkpoints:
    """The `.partial` folder of one run; `identity` is what a state must match to be resumed."""

    folder: Path
    identity: dict

    @classmethod
    def beside(cls, out: Path, identity: dict) -> "Checkpoints":
        return cls(progress_folder(out), json.loads(json.dumps(identity)))

    def load(self, force: bool) -> RunState | None:
        """The state of a killed run of this identity, or None; another run's state is refused
        (discarded with `force`)."""
        path = self.folder / STATE
        if not path.exists():
            self.remove()  # killed before its first checkpoint: nothing to keep
            return None
        saved = json.loads(path.read_text())
        if saved.get("identity") != self.identity:
            if not force:
                raise DogtlError(f"{self.folder} holds an unfinished fine-tuning with other settings or another "
                                 "head: rerun it with those settings to finish it, or pass --force to discard it")
            self.remove()
            return None
        return RunState.from_json(saved["state"])

    def save_model(self, model, epoch: int, tag: str = "") -> str:
        """Checkpoint `model` (with its optimizer) as the model of `epoch` (`tag`: another model of
        the same epoch); returns its file name."""
        self.folder.mkdir(exist_ok=True)
        name = f"epoch-{epoch:04d}{'-' + tag if tag else ''}.keras"
        with atomic_path(self.folder / name) as tmp:
            model.save(tmp)
        return name

    def load_model(self, name: str, state: RunState):
        """A checkpointed model of `state`, compiled, with its optimizer state (under the caller's
        scope); refused if it is not the file `state` recorded."""
        import keras  # local: loads TensorFlow, which a multi-worker run must start first (train.py)

        from dogtl.finetuning import optimizer  # noqa: F401  # local: registers the layer-wise optimizers and the loss (Keras)
        from dogtl.core import schedules  # noqa: F401  # local: registers the cyclical schedules for loading (Keras)

        path = self.folder / name
        if name in state.hashes and file_sha256(path) != state.hashes[name]:
            raise DamagedError(f"{path}: damaged (its content hash differs from the one in {STATE}); "
                               f"delete {self.folder} and rerun the same command to start this fine-tuning over")
        return keras.saving.load_model(path, compile=True)

    def commit(self, state: RunState) -> None:
        """Record `state` (atomically), then drop the checkpoints it no longer needs."""
        kept = {state.best_file, state.last_file}
        state.hashes = {name: state.hashes.get(name) or file_sha256(self.folder / name) for name in kept}
        write_json_atomic(self.folder / STATE, {"identity": self.identity, "state": state.to_json()})
        keep = {state.best_file, state.last_file, STATE}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def discard_checkpoints(out: str | Path) -> None:
    """Remove the checkpoints of a stopped fine-tuning run writing `out` (fit's replanning: the run
    starts again with another number of epochs, which its schedule spans)."""
    shutil.rmtree(progress_folder(out), ignore_errors=True)


def finished_epochs(out: str | Path) -> int:
    """Epochs a stopped fine-tuning run writing `out` has finished and checkpointed (0: none)."""
    path = progress_folder(out) / STATE
    try:
        return int(json.loads(path.read_text())["state"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
