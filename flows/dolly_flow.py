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

import json
import re
from pathlib import Path

# isort: off
from training.metaflow_runs import ensure_metaflow_user

ensure_metaflow_user()  # before Metaflow reads the user: a root container runs as "dolly"
# isort: on

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
from model_store import LocalModelStore, resolve_resume_from, run_s3_root, s3_endpoint_env
from preflight_checks import node_preflight, start_preflight
from run_summary import load_instructions, summary_components
from trainer_launch import (
    Nodes,
    launch_command,
    release_shared_memory,
    run_streaming,
    trainer_arguments,
    training_section_problems,
    visible_gpus,
)
from training_card import LiveTrainingCard

from gpu_profile import gpu_profile
from training.preflight import format_findings
from training.progress import PROGRESS_FILE

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The trainer's flags that this flow exposes as parameters; every other trainer flag is set by
# the config's "training" section. Problems are reported in the flow's terms.
PARAMETER_FOR_FLAG = {
    "base_model": "--base-model",
    "dataset": "--dataset",
    "deepspeed": "--deepspeed-config",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "learning_rate": "--learning-rate",
    "per_device_train_batch_size": "--batch-size",
    "peft": "--peft",
    "prompt_format": "--prompt-format",
    "chat_template": "--chat-template",
}
CONFIG_KEY_FOR_FLAG = {"per_device_eval_batch_size": "eval_batch_size"}


class PreflightFailed(MetaflowException):
    """The train node cannot run the planned training (wrong GPUs, driver, /dev/shm, disk...)."""

    headline = "Preflight on the train node failed"


class InvalidRunInputs(MetaflowException):
    """One or more inputs cannot work; raised in `start` with every problem and its fix."""

    headline = "Invalid DollyFlow inputs"


def in_flow_terms(problem: str) -> str:
    """Rename trainer flags in a problem to the flow parameter or config key that sets them."""

    def rename(match: re.Match) -> str:
        name = match.group(1)
        if name in PARAMETER_FOR_FLAG:
            return PARAMETER_FOR_FLAG[name]
        return f"config training.{CONFIG_KEY_FOR_FLAG.get(name, name)}"

    return re.sub(r"--(\w+)", rename, problem)


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
        "max-steps", type=int, default=settings.training.max_steps, help="Stop after N optimizer steps (-1: all epochs)."
    )
    learning_rate = Parameter(
        "learning-rate", type=float, default=settings.training.learning_rate, help="Peak learning rate (AdamW)."
    )
    batch_size = Parameter(
        "batch-size", type=int, default=settings.training.batch_size, help="Training sequences per device per micro-step."
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
        help="s3:// URL for checkpoints and the final model. Default: this run's prefix in "
        "Metaflow's S3 data root when S3 is configured, else local disk only.",
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
        from training.adapters import peft_problems
        from training.arguments import find_problems, parse_args
        from training.base_model import BaseModelError, check_base_model, resolve_base_model
        from training.chat import check_chat_template_setting
        from training.checkpoint_store import CheckpointStoreError
        from training.dataset import DatasetError, load_instruction_data
        from training.evaluation import (
            DEFAULT_EVAL_INSTRUCTIONS,
            EvalInstructionsError,
            load_eval_instructions,
        )

        self.trainer_argv = trainer_arguments(
            base_model=self.base_model,
            dataset=self.dataset,
            deepspeed_config=self.deepspeed_config,
            epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            peft=self.peft,
            training=self.settings.training,
            prompt_format=self.prompt_format,
            chat_template=self.chat_template,
        ) + ["--eval_instructions", self.eval_instructions]
        # The trainer's own parser and checks: start fails with the message the trainer would print.
        model_args, data_args, train_args = parse_args(self.trainer_argv)
        problems = training_section_problems(dict(self.settings.training))
        problems += find_problems(model_args, data_args, train_args)
        # Where checkpoints and the model go: the parameter, else this run's S3 prefix, else "".
        self.checkpoint_root = (self.checkpoint_uri or run_s3_root(current.flow_name, current.run_id)).rstrip("/")
        if self.checkpoint_root and not self.checkpoint_root.startswith("s3://"):
            problems.append(f"--checkpoint-uri: {self.checkpoint_uri!r} is not an s3:// URL.")
        self.resume_checkpoint = ""
        if self.resume_from:
            try:
                self.resume_checkpoint = resolve_resume_from(self.resume_from)
            except (ValueError, KeyError, CheckpointStoreError) as err:
                problems.append(f"--resume-from: {err}")
        nodes = int(self.settings.get("num_nodes", 1))
        if nodes > 1 and not self.MULTI_NODE:
            problems.append(
                f"config num_nodes is {nodes}: run this preset with flows/dolly_multinode_flow.py "
                "(the same flow with train as a @parallel gang), or set num_nodes to 1."
            )
        if self.eval_instructions != "none":
            try:
                load_eval_instructions(self.eval_instructions or DEFAULT_EVAL_INSTRUCTIONS)
            except EvalInstructionsError as err:
                problems.append(str(err))
        # Every problem at once: the data is checked even when a number is already wrong.
        try:
            data = load_instruction_data(data_args.dataset, skip_bad_rows=data_args.skip_bad_rows,
                                         prompt_format=data_args.prompt_format)
        except DatasetError as err:
            problems.append(str(err))
            data = None
        resolved_model = model_args.base_model
        # Resolving may convert the bundled model (~30 s once): only worth it if all else is fine.
        # Another model resolves at once and its layers are checked with the other inputs.
        if not check_base_model(model_args.base_model) and (not problems or not model_args.base_model.startswith("bundled:")):
            try:
                resolved_model = resolve_base_model(model_args.base_model)
            except BaseModelError as err:
                problems.append(str(err))
            else:
                problems += peft_problems(model_args, resolved_model)
                chat_settings_ok = not check_chat_template_setting(data_args.prompt_format, data_args.chat_template)
                if data_args.prompt_format == "chat" and chat_settings_ok:
                    rows = data.train + data.eval if data is not None else []
                    problems += chat_template_problems(model_args, data_args, resolved_model, rows)
        # What the config declares about the hardware against the plan: precision, /dev/shm,
        # GPU memory. The train node checks again with its real facts.
        findings, self.preflight_start = start_preflight(self.settings, model_args, data_args, train_args,
                                                         resolved_model)
        problems += [f.message for f in findings if f.severity == "error"]
        for warning in (f for f in findings if f.severity == "warning"):
            print(f"Preflight warning [{warning.code}]: {in_flow_terms(warning.message)}")
        if problems:
            raise InvalidRunInputs(
                "DollyFlow cannot start:\n  "
                + "\n  ".join(in_flow_terms(p).replace("\n", "\n  ") for p in problems)
            )

        self.dataset_fingerprint = data.fingerprint
        self.config = {
            "preset": self.settings.name,
            "resources": dict(self.settings.resources),
            "base_model": model_args.base_model,
            "base_model_resolved": resolved_model,
            "dataset": data_args.dataset,
            "dataset_rows": {"train": len(data.train), "eval": len(data.eval)},
            "deepspeed_config": train_args.deepspeed,
            "trainer_argv": self.trainer_argv,
            "training": {
                **dict(self.settings.training),
                "epochs": self.epochs,
                "max_steps": self.max_steps,
                "learning_rate": self.learning_rate,
                "batch_size": self.batch_size,
                "peft": self.peft,
                "prompt_format": self.prompt_format,
                "chat_template": self.chat_template,
            },
        }
        print(
            f"Checkpoints and model: {self.checkpoint_root}" if self.checkpoint_root else
            "Checkpoints and model stay on the train node's local disk (no S3 configured; "
            "set --checkpoint-uri or METAFLOW_DATASTORE_SYSROOT_S3)."
        )
        print(
            f"Inputs OK: {model_args.base_model} on {data_args.dataset} "
            f"({len(data.train)} train / {len(data.eval)} eval rows, fingerprint {data.fingerprint[:12]}), "
            f"{data_args.prompt_format} prompt format, DeepSpeed {train_args.deepspeed or 'off'}, preset {self.settings.name}."
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

    def train_on_this_node(self, nodes: Nodes | None = None) -> None:
        """The train step's work on one node; node 0 (the only one without `nodes`) also
        publishes the model and sets `training_metrics`, `evaluation`, `model_location`."""
        nodes = nodes or Nodes()
        store = LocalModelStore(Path(self.settings.get("model_root", "models")))
        workdir = store.workdir(current.flow_name, current.run_id, node=nodes.rank)
        gpus = visible_gpus()
        ranks = gpus or 1
        print(f"Training on {f'{gpus} GPU(s)' if gpus else 'CPU (1 rank)'}{nodes.describe()}; output in {workdir}")
        # This node's real GPUs, driver, NCCL, /dev/shm and disk against the plan, before the
        # trainer loads anything: a wrong node fails in seconds, not after hours.
        findings, self.preflight = node_preflight(self.settings, self.trainer_argv, str(workdir), nodes.count)
        print(format_findings(findings))
        if any(f.severity == "error" for f in findings):
            with LiveTrainingCard(workdir / PROGRESS_FILE, node=nodes.rank, preflight=self.preflight):
                # raised inside: the card's final render shows the failure and the findings
                raise PreflightFailed(in_flow_terms(format_findings(findings)))
        argv = [*self.trainer_argv, "--output_dir", str(workdir)]
        if self.checkpoint_root:
            # A retry (@retry), `resume`, or a fresh run alike: continue from the newest valid
            # checkpoint of this run if there is one, else start from the base model. On several
            # nodes every node uploads its part of each checkpoint and downloads its part back.
            resume = self.resume_checkpoint if self.resume_checkpoint and current.retry_count == 0 else "latest"
            argv += ["--s3_uri", self.checkpoint_root, "--resume_from", resume]
        elif self.resume_checkpoint:
            argv += ["--resume_from", self.resume_checkpoint]
        # World rank 0 (on node 0) writes the metrics stream; other nodes' cards point there.
        command = launch_command(argv, ranks, nodes)
        with LiveTrainingCard(workdir / PROGRESS_FILE, node=nodes.rank, preflight=self.preflight) as live:
            try:
                run_streaming(command, env=s3_endpoint_env())
            finally:
                release_shared_memory(command)  # what killed ranks could not remove themselves
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
            print(f"Answers ending at {metrics.get('end_marker', '### End')}: {metrics['ended_share_base']:.0%} (base) -> "
                  f"{metrics['ended_share_final']:.0%} (tuned) of {len(self.evaluation[0]['answers'])} instructions.")
        print(f"Model: {self.model_location}")
        print("Cards: card view train --id training · card view train --id gpu_profile · card view end")
        how = load_instructions(self.model_location, pathspec)  # markdown for the card
        print("Answer instructions with it:\n" + "\n".join(line for line in how.splitlines() if not line.startswith("```")))


def chat_template_problems(model_args, data_args, model_path: str, rows: list) -> list[str]:
    """What stops --prompt-format chat with this model's tokenizer: no template, one that cannot
    render the data's turns, or whose answers cannot be located exactly (training.chat)."""
    from training.base_model import load_tokenizer
    from training.chat import setup_problems

    try:
        tokenizer = load_tokenizer(model_path, trust_remote_code=model_args.trust_remote_code,
                                   prompt_format="chat", chat_template=data_args.chat_template)
    except OSError as err:  # a hub model on a laptop without hub access: the train node checks again
        print(f"Preflight warning [chat-template]: could not load the tokenizer of {model_path} ({err}); "
              "the chat template is checked on the train node.")
        return []
    return setup_problems(tokenizer, rows, model_args.base_model)


if __name__ == "__main__":
    DollyFlow()
