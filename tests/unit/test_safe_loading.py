"""A checkpoint's pickles never run code: a crafted file is named and refused before it loads, and
every load while resuming is weights_only with the allowlist, even DeepSpeed's weights_only=False.

The trainer's own checkpoints pass both (tests/test_trainer_cli.py resumes one under DeepSpeed;
tests/test_s3_training.py refuses a crafted one downloaded from S3).
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest

from training.safe_loading import ALLOWED_GLOBALS, unsafe_pickles, weights_only_loads


class Payload:
    """What an attacker pickles: loading it with an unrestricted unpickler runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_payload(path: Path, marker: Path) -> Path:
    """A torch.save archive, as DeepSpeed and the Trainer write them, whose pickle runs
    ``touch marker`` when loaded with weights_only=False."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"weight": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


# Every kind of file a resume loads: DeepSpeed's model and optimizer states, the Trainer's RNG
# state, optimizer and scheduler.
LOADED_FILES = ["global_step4/mp_rank_00_model_states.pt", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "rng_state.pth", "rng_state_1.pth", "optimizer.pt", "scheduler.pt"]


@pytest.mark.parametrize("name", LOADED_FILES)
def test_a_payload_is_named_without_running_it(tmp_path, name):
    checkpoint = tmp_path / "checkpoint-4"
    marker = tmp_path / "payload-ran"
    bad = write_payload(checkpoint / name, marker)
    (checkpoint / "trainer_state.json").write_text("{}")

    problems = unsafe_pickles(checkpoint)

    assert problems == [
        f"{bad} holds a pickle that references posix.system, which a checkpoint never needs: it was not "
        "written by this trainer. Delete it or resume from another checkpoint."
    ]
    assert not marker.exists()


def test_a_file_that_is_no_torch_archive_or_uses_other_pickle_opcodes_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    marker = tmp_path / "payload-ran"
    checkpoint.mkdir()
    # A bare pickle (protocol 4: STACK_GLOBAL, which names its import on the stack) in place of an archive.
    (checkpoint / "scheduler.pt").write_bytes(pickle.dumps(Payload(marker), protocol=4))

    (problem,) = unsafe_pickles(checkpoint)

    assert problem.startswith(f"{checkpoint / 'scheduler.pt'} is not a torch.save archive")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["global_step4/mp_rank_00_model_states.pt", "rng_state.pth"])
def test_deepspeeds_own_load_is_weights_only_inside_the_guard(tmp_path, name):
    """DeepSpeed 0.19's checkpoint engine calls torch.load(path, weights_only=False): inside
    weights_only_loads the same call refuses the payload, which never runs."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "payload-ran"
    bad = write_payload(tmp_path / name, marker)

    with weights_only_loads(deepspeed=True), pytest.raises(pickle.UnpicklingError, match="posix.system"):
        TorchCheckpointEngine().load(str(bad), map_location="cpu")

    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is off again after the block


def test_the_allowlist_loads_each_class_a_checkpoint_pickles(tmp_path):
    """What DeepSpeed's optimizer states and the Trainer's RNG state hold, beyond tensors (found
    on real checkpoints: see training/safe_loading.py), loads back under DeepSpeed's own
    weights_only=False call, and nothing of it is reported unsafe."""
    import numpy as np
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": LossScaler(scale=1.0),
        "fp16_loss_scaler": DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                              consecutive_hysteresis=False, dtype=torch.float16),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"model.embed_tokens.weight": fragment_address(numel=12, start=0)}],
        "numpy_rng": np.random.get_state(),
        "tensor": torch.arange(4.0),
    }
    checkpoint = tmp_path / "checkpoint-2"
    path = checkpoint / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    assert unsafe_pickles(checkpoint) == []
    with weights_only_loads(deepspeed=True):
        loaded = TorchCheckpointEngine().load(str(path), map_location="cpu")

    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"] == state["param_slice_mappings"]
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["fp16_loss_scaler"].cur_scale == 2.0**16
    assert (loaded["numpy_rng"][1] == state["numpy_rng"][1]).all()
    assert loaded["tensor"].equal(state["tensor"])
    assert len(ALLOWED_GLOBALS) == len(set(ALLOWED_GLOBALS))


def test_training_args_bin_is_not_loaded_and_not_checked(tmp_path):
    """The Trainer writes training_args.bin (TrainingArguments, accelerate's state) and never
    reads it back: it is not allowlisted, and a checkpoint with it is not refused for it."""
    checkpoint = tmp_path / "checkpoint-2"
    write_payload(checkpoint / "training_args.bin", tmp_path / "payload-ran")

    assert unsafe_pickles(checkpoint) == []
