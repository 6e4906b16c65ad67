"""Resuming without running code from a checkpoint: every pickle loads with ``weights_only=True``.

A checkpoint's ``.pt``/``.pth`` files are pickles, and an unrestricted unpickler runs whatever a
crafted file tells it to (``os.system``, ``exec``). The HF Trainer loads its own files
(``rng_state*.pth``, ``optimizer.pt``, ``scheduler.pt``) with ``weights_only=True`` already;
DeepSpeed 0.19 loads ``mp_rank_*_model_states.pt`` and ``*_optim_states.pt`` with
``weights_only=False``. So, on every resume (a local ``--resume_from`` folder as well as one
downloaded from S3, whose manifest proves integrity but not authorship: docs/checkpoints.md):

- :func:`unsafe_pickles` reads the pickle opcodes of every such file without running them and
  names each file that references anything beyond tensors and :data:`ALLOWED_GLOBALS`, before the
  model is loaded;
- :func:`weights_only_loads` makes every ``torch.load`` inside it load with
  ``weights_only=True`` and that allowlist, whatever the caller asks for, so a file swapped after
  the check is refused too.

    problems = unsafe_pickles(Path("out/resume/checkpoint-200"))       # [] for our checkpoints
    with weights_only_loads(deepspeed=True):
        trainer.train(resume_from_checkpoint="out/resume/checkpoint-200")
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

# What a checkpoint of this trainer pickles beyond what torch's weights_only loader allows by
# itself (tensors, storages, torch.Size, OrderedDict, builtins). Found by saving checkpoints with
# the tiny test model (plain, LoRA, DeepSpeed ZeRO-2 and ZeRO-3 on one CPU rank, LoRA under
# ZeRO-3) and listing, for each file, what torch.serialization.get_unsafe_globals_in_checkpoint
# reported; then each file loaded with weights_only=True and this list.
NUMPY_RNG_STATE = (
    # rng_state*.pth: numpy's Mersenne Twister state, an array of uint32 (the Trainer's own
    # transformers.trainer_pt_utils.safe_globals allows the same four).
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",  # the same function, as numpy 1.x names it
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",  # what numpy.dtype("uint32") builds: not in the opcodes, but loaded
)
DEEPSPEED_OPTIMIZER_STATE = (
    # *_optim_states.pt of ZeRO-2 and ZeRO-3: the loss scaler object, the stage as an enum, and
    # (ZeRO-2) where each parameter's slice lies in the flat fp32 partition.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # fp16 with dynamic loss scaling (the V100 preset) pickles this one instead: read from
    # DeepSpeed's CreateLossScaler, not measured (fp16 needs a GPU).
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
ALLOWED_GLOBALS = NUMPY_RNG_STATE + DEEPSPEED_OPTIMIZER_STATE

# The files a resume loads with torch.load: DeepSpeed's model and optimizer states (.pt), the
# Trainer's optimizer, scheduler and scaler (.pt), RNG states (.pth), and weights saved as .bin.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Written by the Trainer for people, read by nothing on resume: it pickles TrainingArguments and
# accelerate's state (a dozen classes no weights_only load should allow), so it is not checked
# here and never published with the model.
TRAINING_ARGS = "training_args.bin"


def unsafe_pickles(checkpoint: Path) -> list[str]:
    """One line per file of ``checkpoint`` that a weights_only load with :data:`ALLOWED_GLOBALS`
    would refuse, naming the file and the fix; empty when every file is safe to load.

    Reads only the pickle's opcodes (torch's own static scan): nothing in the file runs.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    problems = []
    fix = "it was not written by this trainer. Delete it or resume from another checkpoint."
    for path in sorted(p for p in checkpoint.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.name != TRAINING_ARGS):
        try:
            unsafe = sorted(set(get_unsafe_globals_in_checkpoint(path)) - set(ALLOWED_GLOBALS))
        except ValueError:  # torch: "Expected input to be a checkpoint returned by torch.save"
            problems.append(f"{path} is not a torch.save archive: {fix}")
            continue
        except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
            # An opcode torch.save never writes (STACK_GLOBAL, INST: imports the scan cannot
            # name), a truncated pickle, or a zip without data.pkl (torch's zip reader).
            problems.append(f"{path} holds a pickle this trainer cannot check ({err}): {fix}")
            continue
        if unsafe:
            problems.append(f"{path} holds a pickle that references {', '.join(unsafe)}, which a checkpoint "
                            f"never needs: {fix}")
    return problems


def _resolve(name: str) -> tuple[object, str] | None:
    """(the object, the name a pickle calls it), or None where this numpy lacks it (numpy 1.x has
    no ``numpy._core``; numpy 2 keeps ``numpy.core`` as a deprecated alias)."""
    module, _, attribute = name.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return getattr(importlib.import_module(module), attribute), name
        except (ImportError, AttributeError):
            return None


@contextlib.contextmanager
def weights_only_loads(*, deepspeed: bool) -> Iterator[None]:
    """Inside the block every ``torch.load`` loads with ``weights_only=True`` and
    :data:`ALLOWED_GLOBALS` (DeepSpeed's classes only when ``deepspeed``: a run without it never
    loads its files, and importing it costs seconds), even where the caller passes
    ``weights_only=False``.

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own switch for that, read at every torch.load; it is
    process-wide, which is what the block needs: DeepSpeed and the Trainer load the checkpoint
    from the main thread, and nothing else in the process unpickles while it trains (the upload
    thread only reads files for their bytes).
    """
    import torch

    names = NUMPY_RNG_STATE + (DEEPSPEED_OPTIMIZER_STATE if deepspeed else ())
    allowed = [found for found in map(_resolve, names) if found is not None]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
