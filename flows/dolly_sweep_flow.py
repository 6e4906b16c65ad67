"""DollySweepFlow: several training settings in parallel, compared on one card, the best kept.

Steps:
    start    expand the grid (the config's "sweep" section, or --grid) and check every point as
             DollyFlow's start checks one run; every problem of every point is reported at once,
             naming the point.
    train    foreach point: DollyFlow's train step with the point's settings, each with its own
             checkpoints, model, `training` and `gpu_profile` cards and preflight. A point that
             fails is recorded (@catch) instead of failing the sweep.
    compare  the join: `results` (one row per point), `best` (by --select) and the `comparison`
             card: the table, every point's eval loss on one chart, every point's answers.
    end      the best point's model as `model_location`, its settings as tags of the run.

Run it:
    python flows/dolly_sweep_flow.py run                                 # bundled default: 2 points, CPU
    # few cores: one point at a time
    python flows/dolly_sweep_flow.py run --grid "learning_rate=1e-4,3e-4 epochs=1,2" --max-workers 1
    python flows/dolly_sweep_flow.py --config config flows/configs/a100x4.json run \\
        --grid "learning_rate=1e-5,2e-5" --with kubernetes                # one GPU pod per point
    python flows/dolly_sweep_flow.py card view compare --id comparison
    python -m training.generate --run DollySweepFlow/<run id> "What is a haiku?"   # the best model
"""

import time

# isort: off
from training.metaflow_runs import ensure_metaflow_user

ensure_metaflow_user()  # before Metaflow reads the user: a root container runs as "dolly"
# isort: on

from comparison_card import SELECTIONS, comparison_components, pick_best, result_row
from dolly_flow import CONFIG_DIR, DollyFlow, InvalidRunInputs
from kubernetes_settings import kubernetes_settings
from metaflow import Config, Parameter, card, catch, current, resources, retry, step
from metaflow.exception import MetaflowException
from start_checks import InputChecker, run_wide_checks
from summary_card import change, or_na
from sweep_grid import GridError, point_name, sweep_points

from gpu_profile import gpu_profile


class SweepFailed(MetaflowException):
    """No point of the sweep finished training; the comparison card lists every point's error."""

    headline = "Every point of the sweep failed"


class DollySweepFlow(DollyFlow):
    """Fine-tune once per point of a grid of settings, in parallel, and keep the best model."""

    settings = Config(
        "config",
        default=str(CONFIG_DIR / "local-cpu-sweep.json"),
        help="Hardware and training preset, with an optional \"sweep\" section: lists of values per "
        "training key (their product is the grid) or \"points\", and max_points (default 8).",
    )
    grid = Parameter(
        "grid",
        type=str,
        default="",
        help="The grid instead of the config's sweep section: space-separated key=value,value... over "
        "the config's training keys, e.g. \"learning_rate=1e-4,5e-5 epochs=1,2\" (4 points).",
    )
    select = Parameter(
        "select",
        type=str,
        default="eval_loss",
        help="How the best point is chosen: eval_loss (lowest after training) or ended_share (most "
        "evaluation answers that end by themselves). Ties go to the other metric, then the earlier point.",
    )

    @kubernetes_settings
    @step
    def start(self):
        """Expand the grid and check every point; one problem list for all of them."""
        run_wide = run_wide_checks(self, current.flow_name, current.run_id)
        self.checkpoint_root, self.resume_checkpoint = run_wide.checkpoint_root, run_wide.resume_checkpoint
        problems = run_wide.problems
        if self.select not in SELECTIONS:
            problems.append(f"--select: {self.select!r} is not one of {', '.join(SELECTIONS)}.")
        if self.select == "ended_share" and self.eval_instructions == "none":
            # Without answers no point has the metric: every point would train, then none be "best".
            problems.append("--select ended_share: compares the evaluation answers, which --eval-instructions "
                            "none turns off; use --select eval_loss, or keep the evaluation.")
        if self.resume_from:
            problems.append("--resume-from: a sweep trains every point from its base model; resume one "
                            "point's training with DollyFlow and that point's settings.")
        try:
            points, _ = sweep_points(self.settings.get("sweep"), self.grid)
        except GridError as err:  # without points nothing else can be checked: report what is known
            raise InvalidRunInputs("DollySweepFlow cannot start:\n  " + "\n  ".join([*problems, str(err)])) from None
        checker = InputChecker(self)
        checked_points, per_point, warnings = [], [], []
        for settings in points:
            found, checked = checker.check(settings, already_wrong=bool(problems))
            per_point.append(found)
            warnings += [w for w in checked.warnings if w not in warnings]
            checked_points.append((settings, checked))
        for warning in warnings:
            print(warning)
        # A problem every point has (a missing data set) is named once, the others per point.
        shared = [p for p in per_point[0] if all(p in found for found in per_point[1:])]
        problems += shared
        for index, (found, (settings, _)) in enumerate(zip(per_point, checked_points, strict=True)):
            problems += [f"point {index + 1} ({point_name(settings)}): {p}" for p in found if p not in shared]
        if problems:
            raise InvalidRunInputs(
                "DollySweepFlow cannot start:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))
        self.points = [
            {"index": index, "name": point_name(settings), "settings": settings, "trainer_argv": checked.trainer_argv,
             "config": checked.config, "preflight_start": checked.preflight}
            for index, (settings, checked) in enumerate(checked_points)
        ]
        data = checked_points[0][1].data
        self.dataset_fingerprint = data.fingerprint
        print(f"Sweep of {len(self.points)} points on {self.base_model} / {self.dataset} "
              f"({len(data.train)} train / {len(data.eval)} eval rows), best by {self.select}:")
        for point in self.points:
            print(f"  point {point['index'] + 1}: {point['name']}")
        self.next(self.train, foreach="points")

    @catch(var="train_failure", print_exception=True)
    @retry(times=settings.retries, minutes_between_retries=0)
    @card(type="blank", id="training", refresh_interval=5)
    @gpu_profile(interval=1)
    @kubernetes_settings
    @resources(
        cpu=settings.resources.cpu,
        gpu=settings.resources.gpu,
        memory=settings.resources.memory,
        shared_memory=settings.resources.shared_memory,
    )
    @step
    def train(self):
        """DollyFlow's training with this point's settings (its own directory and S3 prefix)."""
        self.point = self.input
        self.trainer_argv, self.config = self.point["trainer_argv"], self.point["config"]
        self.preflight_start = self.point["preflight_start"]  # this point's plan, as start made it
        print(f"Point {self.point['index'] + 1} of the sweep: {self.point['name']}")
        started = time.time()
        self.train_on_this_node(branch=f"point-{self.point['index'] + 1}")
        self.train_wall_s = time.time() - started
        self.next(self.compare)

    @card(type="blank", id="comparison")
    @kubernetes_settings
    @step
    def compare(self, inputs):
        """One row per point, the best point, and the comparison card."""
        gpus = int(self.settings.resources.gpu or 0)
        rows, answers, by_point = [], {}, {}
        for branch in inputs:
            point = branch.input
            failure = getattr(branch, "train_failure", None)
            error = str(failure).strip().splitlines()[-1] if failure is not None else None
            metrics = getattr(branch, "training_metrics", None) if failure is None else None
            rows.append(result_row(point, metrics=metrics, error=error, wall_s=getattr(branch, "train_wall_s", None),
                                   gpus=gpus, model_location=getattr(branch, "model_location", None)))
            evaluation = getattr(branch, "evaluation", None) if failure is None else None
            if evaluation:
                answers[point["index"]] = evaluation[-1]["answers"]
            by_point[point["index"]] = branch
        rows.sort(key=lambda row: row["point"])
        self.results = rows
        best = pick_best(rows, self.select)
        current.card["comparison"].extend(comparison_components(rows, best, self.select, answers))
        if best is None:
            errors = "\n  ".join(f"point {r['point'] + 1} ({r['name']}): {r['error']}" for r in rows)
            raise SweepFailed(f"No point finished training (card view compare --id comparison):\n  {errors}")
        self.best = best
        winner = by_point[best["point"]]
        self.model_location = winner.model_location
        self.training_metrics = winner.training_metrics
        self.evaluation = winner.evaluation
        self.config = winner.config
        self.next(self.end)

    @kubernetes_settings
    @step
    def end(self):
        """Tag the run with the best point's settings and say where its model is."""
        from metaflow import Run

        best = self.best
        tags = [f"best:{key}={value}" for key, value in best["settings"].items()] or ["best:defaults"]
        Run(f"{current.flow_name}/{current.run_id}").add_tags(tags)
        for row in self.results:
            # "n/a" where a figure does not exist (no answers under --eval-instructions none).
            status = (f"eval loss {change(row['eval_loss_before'], row['eval_loss_after'], '.4f')}, answers ending "
                      f"{or_na(row['ended_share_final'], '.0%')}" if row["status"] == "ok"
                      else f"failed: {row['error']}")
            print(f"{'*' if row['point'] == best['point'] else ' '} point {row['point'] + 1} ({row['name']}): {status}")
        print(f"Best (--select {self.select}): point {best['point'] + 1}, {best['name']}; tags {', '.join(tags)}")
        print(f"Model: {self.model_location}")
        print(f"Card: card view compare --id comparison · python -m training.generate --run "
              f"{current.flow_name}/{current.run_id} \"What is a haiku?\"")


if __name__ == "__main__":
    DollySweepFlow()
