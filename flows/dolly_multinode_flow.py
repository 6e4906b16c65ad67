"""DollyMultiNodeFlow: DollyFlow with its train step run by a gang of nodes (Metaflow @parallel).

Steps:
    start   the same checks as DollyFlow, then `num_nodes` (from the config) train tasks at once.
    train   @parallel: every node runs `torch.distributed.run --nnodes N --node_rank R` with one
            rank per GPU, meeting at node 0's address (Metaflow's parallel environment gives it;
            no SSH, no hostfile). One DeepSpeed job across all of them. World rank 0 (node 0)
            writes the metrics stream, the evaluation and the model; every node has its own
            `gpu_profile` card.
    gather  the join: node 0's model and metrics, every node's GPU profile (`node_profiles`).
    end     DollyFlow's summary and card.

Run it:
    python flows/dolly_multinode_flow.py run      # 2 local "nodes" on this machine (CPU, gloo)
    python flows/dolly_multinode_flow.py --config config flows/configs/a100x4x2.json run --with kubernetes
    python flows/dolly_multinode_flow.py --config config flows/configs/a100x4x2.json argo-workflows create

On Kubernetes and Argo Workflows a @parallel step runs as a JobSet: the cluster needs the JobSet
controller (https://jobset.sigs.k8s.io). Single-node training stays in DollyFlow, which needs none.
"""

from dolly_flow import CONFIG_DIR, DollyFlow
from kubernetes_settings import kubernetes_settings
from metaflow import Config, card, current, parallel, resources, retry, step
from trainer_launch import Nodes

from gpu_profile import gpu_profile

# Artifacts that differ from node to node: kept per node (node_profiles), not merged.
PER_NODE = ("gpu_profile_data", "gpu_profile_num_gpus", "node_index", "preflight")


class DollyMultiNodeFlow(DollyFlow):
    """Fine-tune across several nodes: DollyFlow's recipe, one DeepSpeed job over a gang."""

    MULTI_NODE = True
    settings = Config(
        "config",
        default=str(CONFIG_DIR / "local-cpu-2nodes.json"),
        help="Hardware and training preset with num_nodes (flows/configs/local-cpu-2nodes.json, "
        "a100x4x2.json). Pass with --config config PATH.",
    )

    @step
    def start(self):
        """Validate every input, then start `num_nodes` train tasks."""
        self.check_inputs()
        self.next(self.train, num_parallel=int(self.settings.num_nodes))

    @parallel
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
        """This node's part of the job: its GPUs (or one CPU rank) in the gang's DeepSpeed job."""
        self.node_index = current.parallel.node_index
        self.train_on_this_node(Nodes.from_parallel(current.parallel, current.run_id))
        self.next(self.gather)

    @kubernetes_settings
    @step
    def gather(self, inputs):
        """Keep node 0's model and metrics and every node's GPU profile and preflight."""
        self.node_profiles = {i.node_index: i.gpu_profile_data for i in inputs}
        self.node_preflights = {i.node_index: i.preflight for i in inputs}
        self.merge_artifacts(inputs, exclude=list(PER_NODE))
        self.next(self.end)


if __name__ == "__main__":
    DollyMultiNodeFlow()
