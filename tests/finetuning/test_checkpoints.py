"""finetuning.checkpoints: a resumed run never trains on a checkpoint damaged on disk."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dogtl.core.early_stopping import EarlyStopping
from dogtl.core.errors import DamagedError
from dogtl.finetuning.checkpoints import Checkpoints, RunState


def _model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


def test_a_checkpoint_with_a_flipped_byte_is_refused_on_resume(tmp_path):
    identity = {"settings": 1}
    run = Checkpoints.beside(tmp_path / "f.keras", identity)
    model = _model()
    name = run.save_model(model, 1)
    run.commit(RunState(epoch=1, before={}, best={}, best_file=name, last_file=name, trainable_layers=[],
                        head_difference=0.0, stopping=EarlyStopping(2)))

    resumed = Checkpoints.beside(tmp_path / "f.keras", identity)  # a new process
    state = resumed.load(force=False)
    assert state.last_file == name
    loaded = resumed.load_model(name, state)  # intact: loads, same weights
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights()))

    path = run.folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    resumed = Checkpoints.beside(tmp_path / "f.keras", identity)
    state = resumed.load(force=False)
    with pytest.raises(DamagedError, match=rf"{name}: damaged .*delete .*f.keras.partial and rerun"):
        resumed.load_model(name, state)
