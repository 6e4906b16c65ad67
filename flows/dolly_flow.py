"""DollyFlow: instruction fine-tuning with the Dolly v2 recipe, from a laptop to Kubernetes GPUs.

Steps:
    start  resolve and validate every input (model, data, DeepSpeed config, numbers) and fail
           here, before any GPU is spent; record `config` and `dataset_fingerprint`.
    train  run the HF Trainer script under DeepSpeed, one process per visible GPU (one CPU rank
           without a GPU), its output streamed into the task log; publish the model.
           Two live cards: `card view train --id training` (loss, learning rate, gradient norm,
           tokens/s, progress and ETA, the evaluation table) and `card view train --id
           gpu_profile` (@gpu_profile: every GPU and the host).
    end    print and card (`card view end`) the run's summary: what was trained, how it did,
           where the model is and how to load it.

Run it:
    python flows/dolly_flow.py run                                   # bundled model + data, CPU
    python flows/dolly_flow.py run --epochs 2 --learning-rate 1e-4
    python flows/dolly_flow.py run --peft lora --learning-rate 1e-3   # LoRA adapters, frozen base
    python flows/dolly_flow.py run --prompt-format chat              # the model's chat template
    python flows/dolly_flow.py --config config flows/configs/a100x4.json run --with kubernetes
    python flows/dolly_flow.py run --help                            # every parameter
"""

import atexit
import gc
import json
from pathlib import Path

# isort: off
from training.metaflow_runs import ensure_metaflow_user

ensure_metaflow_user()  # before Metaflow reads the user: a root container runs as "dolly"
# isort: on

# Every process of a run imports this file (the runtime, each task, each `card create`). At exit,
# the garbage collector would walk every object of torch and transformers again while the
# interpreter tears the modules down: ~2 s per process that imported them (1.7 s for torch
# alone, measured on 2 cores); frozen, the collector skips them. Nothing else changes: the other
# atexit handlers (Metaflow's, logging's flush) and the modules' teardown still run.
atexit.register(gc.freeze)

from kubernetes_settings import kubernetes_settings
from metaflow import (
    Config,
    FlowSpec,
    Parameter,
    card,
    config_expr,
    current,
    package_sources,
    resources,
    retry,
    step,
)
from metaflow.exception import MetaflowException
from preflight_checks import node_preflight
from run_storage import LocalModelStore, resume_source, s3_endpoint_env
from start_checks import InputChecker, in_flow_terms, run_wide_checks
from summary_card import load_instructions, summary_components
from trainer_launch import (
    Nodes,
    launch_command,
    release_shared_memory,
    run_streaming,
)
from training_card import LiveTrainingCard

from gpu_profile import gpu_profile
from training.preflight import format_findings
from training.progress import PROGRESS_FILE

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

class PreflightFailed(MetaflowException):
    """The train node cannot run the planned training (wrong GPUs, driver, /dev/shm, disk...)."""

    headline = "Preflight on the train node failed"


class InvalidRunInputs(MetaflowException):
    """One or more inputs cannot work; raised in `start` with every problem and its fix."""

    headline = "Invalid DollyFlow inputs"


# training/, gpu_profile/ and ds_configs/ live beside flows/, not in it: ship them in the code
# package so remote tasks (Kubernetes, Argo) find them.
@package_sources(
    [
        ("../training", "training"),
        ("../gpu_profile", "gpu_profile"),
        ("../ds_configs", "ds_configs"),
        ("configs", "configs"),
    ],
    suffixes=[".py", ".json", ".jsonl", ".jinja"],
)
class DollyFlow(FlowSpec):
    """Fine-tune a causal LM on instruction data (Dolly v2 prompt format, completion-only loss)."""

    MULTI_NODE = False  # DollyMultiNodeFlow runs train as a gang of config num_nodes nodes

    settings = Config(
        "config",
        default=str(CONFIG_DIR / "local-cpu.json"),
        help="Hardware and training preset (flows/configs/*.json): resources, base model, data, "
        "DeepSpeed config, hyperparameters. Pass with --config config PATH.",
    )

    base_model = Parameter(
        "base-model",
        type=str,
        default=settings.base_model,
        help="Base model: a hub id (EleutherAI/pythia-2.8b), a local model directory, or "
        "bundled:smollm2-135m-instruct. Default: the config's base_model.",
    )
    dataset = Parameter(
        "dataset",
        type=str,
        default=settings.dataset,
        help="Instruction data: a hub id, a local .jsonl/.json/.parquet file or directory, an "
        "s3:// URL, or bundled:dolly-sample. Default: the config's dataset.",
    )
    epochs = Parameter("epochs", type=float, default=settings.training.epochs, help="Passes over the training rows.")
    max_steps = Parameter(
        "max-steps", type=int, default=settings.training.max_steps,
        help="Stop after N optimizer steps (-1: all epochs)."
    )
    learning_rate = Parameter(
        "learning-rate", type=float, default=settings.training.learning_rate, help="Peak learning rate (AdamW)."
    )
    batch_size = Parameter(
        "batch-size", type=int, default=settings.training.batch_size,
        help="Training sequences per device per micro-step."
    )
    peft = Parameter(
        "peft",
        type=str,
        default=config_expr("config.training.get('peft', 'none')"),
        help="none: full fine-tuning. lora: LoRA adapters (peft), base weights frozen. qlora: LoRA "
        "on a 4-bit NF4 base (bitsandbytes). Rank, alpha, dropout and target modules: config "
        "training.lora_*. Default: the config's training.peft, else none.",
    )
    prompt_format = Parameter(
        "prompt-format",
        type=str,
        default=config_expr("config.training.get('prompt_format', 'dolly')"),
        help="dolly: the Dolly v2 prompt (### Instruction / ### Response / ### End). chat: every row "
        "(Dolly, Alpaca, messages or ShareGPT conversations) rendered with the model's chat template, "
        "the loss on the assistant turns only; the tuned model answers in that template. Default: "
        "the config's training.prompt_format, else dolly.",
    )
    chat_template = Parameter(
        "chat-template",
        type=str,
        default=config_expr("config.training.get('chat_template', '')"),
        help="Under --prompt-format chat: chatml, or a Jinja chat template file (keep it in flows/configs/ "
        "so remote runs get it), replacing the model's own; needed for a model without one. "
        "Default: the config's training.chat_template, else the model's template.",
    )
    deepspeed_config = Parameter(
        "deepspeed-config",
        type=str,
        default=settings.deepspeed_config,
        help="DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, zero3_offload.json, GPU presets); "
        "empty string: no DeepSpeed.",
    )

    eval_instructions = Parameter(
        "eval-instructions",
        type=str,
        default="",
        help="Instructions answered by the base model and after every epoch (.jsonl of "
        "{instruction, context}). Default: training/data/eval_instructions.jsonl; 'none' skips.",
    )
    checkpoint_uri = Parameter(
        "checkpoint-uri",
        type=str,
        default="",
        help="s3:// URL under which this run keeps its checkpoints and final model "
        "(<url>/<flow>/<run id>/). Default: this run's prefix in Metaflow's S3 data root when S3 "
        "is configured, else local disk only.",
    )
    resume_from = Parameter(
        "resume-from",
        type=str,
        default="",
        help="Start from a checkpoint: its s3:// URL, or a previous run's pathspec "
        "(DollyFlow/<run id>) to continue from that run's newest valid checkpoint.",
    )

    @kubernetes_settings
    @step
    def start(self):
        """Validate every input and record the resolved configuration."""
        self.check_inputs()
        self.next(self.train)

    def check_inputs(self) -> None:
        """Every check of `start`, shared with DollyMultiNodeFlow: raises InvalidRunInputs."""
        run_wide = run_wide_checks(self, current.flow_name, current.run_id)
        self.checkpoint_root, self.resume_checkpoint = run_wide.checkpoint_root, run_wide.resume_checkpoint
        problems = run_wide.problems
        run_problems, checked = InputChecker(self).check({}, already_wrong=bool(problems))
        problems += run_problems
        for warning in checked.warnings:
            print(warning)
        if problems:
            raise InvalidRunInputs(
                "DollyFlow cannot start:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))
        self.trainer_argv, self.config, self.preflight_start = checked.trainer_argv, checked.config, checked.preflight
        data = checked.data
        self.dataset_fingerprint = data.fingerprint
        print(
            f"Checkpoints and model: {self.checkpoint_root}" if self.checkpoint_root else
            "Checkpoints and model stay on the train node's local disk (no S3 configured; "
            "set --checkpoint-uri or METAFLOW_DATASTORE_SYSROOT_S3)."
        )
        training = self.config["training"]
        print(
            f"Inputs OK: {self.config['base_model']} on {self.config['dataset']} "
            f"({len(data.train)} train / {len(data.eval)} eval rows, fingerprint {data.fingerprint[:12]}), "
            f"{training['prompt_format']} prompt format, DeepSpeed {self.config['deepspeed_config'] or 'off'}, "
            f"preset {self.settings.name}."
        )

    # Preemptible GPUs: a retried attempt resumes from the newest valid checkpoint in S3.
    @retry(times=settings.retries, minutes_between_retries=0)
    @card(type="blank", id="training", refresh_interval=5)
    @gpu_profile(interval=1)
    @kubernetes_settings  # the config's "kubernetes" section, under --with kubernetes / Argo
    @resources(
        cpu=settings.resources.cpu,
        gpu=settings.resources.gpu,
        memory=settings.resources.memory,
        shared_memory=settings.resources.shared_memory,
    )
    @step
    def train(self):
        """Run the trainer under DeepSpeed, one rank per visible GPU (one CPU rank without GPUs)."""
        self.train_on_this_node()
        self.next(self.end)

    def train_on_this_node(self, nodes: Nodes | None = None, branch: str = "") -> None:
        """The train step's work on one node; node 0 (the only one without `nodes`) also
        publishes the model and sets `training_metrics`, `evaluation`, `model_location`.

        ``branch``: one of several trainings of the run (a sweep point, ``point-2``), with its
        own local directory and S3 prefix."""
        nodes = nodes or Nodes()
        store = LocalModelStore(Path(self.settings.get("model_root", "models")))
        workdir = store.workdir(current.flow_name, current.run_id, node=nodes.rank, branch=branch)
        checkpoint_root = self.checkpoint_root
        if checkpoint_root and branch:
            checkpoint_root = f"{checkpoint_root}/{branch}"
        # This node's real GPUs, driver, NCCL, /dev/shm and disk against the plan, before the
        # trainer loads anything: a wrong node fails in seconds, not after hours.
        findings, self.preflight = node_preflight(self.settings, self.trainer_argv, str(workdir), nodes.count,
                                                  start_record=self.preflight_start)
        gpus = len(self.preflight["facts"]["gpus"] or [])  # as torch sees them, CUDA_VISIBLE_DEVICES applied
        ranks = gpus or 1
        print(f"Training on {f'{gpus} GPU(s)' if gpus else 'CPU (1 rank)'}{nodes.describe()}; output in {workdir}")
        print(format_findings(findings))
        if any(f.severity == "error" for f in findings):
            with LiveTrainingCard(workdir / PROGRESS_FILE, node=nodes.rank, preflight=self.preflight):
                # raised inside: the card's final render shows the failure and the findings
                raise PreflightFailed(in_flow_terms(format_findings(findings)))
        argv = [*self.trainer_argv, "--output_dir", str(workdir)]
        resume = resume_source(self.resume_checkpoint, retry_count=current.retry_count,
                               resumed_run=bool(current.origin_run_id), uploads=bool(checkpoint_root))
        if checkpoint_root:
            # On several nodes every node uploads its part of each checkpoint and downloads its
            # part back.
            argv += ["--s3_uri", checkpoint_root]
        if resume:
            argv += ["--resume_from", resume]
        # World rank 0 (on node 0) writes the metrics stream; other nodes' cards point there.
        launch = launch_command(argv, ranks, nodes)
        with LiveTrainingCard(workdir / PROGRESS_FILE, node=nodes.rank, preflight=self.preflight) as live:
            try:
                run_streaming(launch.command, env={**s3_endpoint_env(), **launch.env})
            finally:
                release_shared_memory(launch)  # what killed ranks could not remove themselves
        if nodes.rank != 0:
            return  # node 0 publishes the model and the metrics
        # The curves of the card as (step, value) lists: loss, eval_loss, learning_rate, ...
        self.training_history = live.history()
        self.training_metrics = json.loads((workdir / "metrics.json").read_text())
        # The epoch x instruction table: base model first, then each epoch (and the end).
        self.evaluation = self.training_metrics.pop("evaluation", [])
        uploads = workdir / "s3_uploads.json"
        if uploads.is_file():
            self.checkpoint_manifest = json.loads(uploads.read_text())
            self.model_location = self.checkpoint_manifest["model_location"]
        else:
            self.checkpoint_manifest = {}
            self.model_location = store.publish(workdir)

    @card(type="blank", id="summary")
    @kubernetes_settings
    @step
    def end(self):
        """Report where the model is and how it did (also as the card `card view end`)."""
        metrics = self.training_metrics
        pathspec = f"{current.flow_name}/{current.run_id}"
        current.card["summary"].extend(summary_components(
            pathspec=pathspec, config=self.config, metrics=metrics, evaluation=self.evaluation,
            model_location=self.model_location,
        ))
        print(
            f"Eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} "
            f"after {metrics['global_step']} steps ({metrics['train_runtime_s']:.0f} s, "
            f"{metrics['tokens_per_second']:.0f} tokens/s)."
        )
        if metrics.get("ended_share_base") is not None:
            print(f"Answers ending at {metrics.get('end_marker', '### End')}: "
                  f"{metrics['ended_share_base']:.0%} (base) -> "
                  f"{metrics['ended_share_final']:.0%} (tuned) of {len(self.evaluation[0]['answers'])} instructions.")
        print(f"Model: {self.model_location}")
        print("Cards: card view train --id training · card view train --id gpu_profile · card view end")
        how = load_instructions(self.model_location, pathspec)  # markdown for the card
        print("Answer instructions with it:\n"
              + "\n".join(line for line in how.splitlines() if not line.startswith("```")))


if __name__ == "__main__":
    DollyFlow()
