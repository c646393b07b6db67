"""``nemo-lossfree slurm``: render an sbatch job from a run config, submit it, wait.

    nemo-lossfree slurm --config configs/tiny-cpu.yaml --gpus-per-node 0 --ntasks-per-node 2 --wait
    nemo-lossfree slurm --config configs/deepseek-v3-1024gpu.yaml --recipe deepseek_v3_pretrain_config \\
        --nodes 128 --gpus-per-node 8 --account ACCT --partition batch --time 04:00:00 \\
        --container-image 'nvcr.io#nvidia/nemo:TAG' --container-mounts /lustre:/lustre --dry-run

Nodes, GPUs per node and tasks per node come from the config's ``cluster:``
section unless given here. The config, with that layout, must pass
``nemo-lossfree validate-config`` (the same check, ``validate_config.validate``)
before anything is written or submitted. The job directory (``--output-dir``,
checked for writing before the script is, even with ``--dry-run``) receives
the script, ``logs/<job>-<id>.out``, and for CPU jobs ``results/`` (the
worker's JSON) and ``checkpoints/`` (unless the config's ``checkpoint.save``
names one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

from nemo_lossfree.apps.commands import check_output_dir
from nemo_lossfree.apps.commands.validate_config import validate
from nemo_lossfree.apps.slurm.job import LAUNCHERS, SlurmJob
from nemo_lossfree.exit_codes import EXIT_FAILED, EXIT_USAGE

PREFIX = "nemo-lossfree slurm: "
LAYOUT_FLAGS = (("--nodes", "nodes"), ("--gpus-per-node", "gpus_per_node"),
                ("--ntasks-per-node", "ntasks_per_node"))


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="run config (YAML), e.g. configs/tiny-cpu.yaml")
    p.add_argument("--recipe", default=None,
                   help="GPU jobs (required there): the Megatron-Bridge recipe the config completes, "
                        "e.g. deepseek_v3_pretrain_config (passed to nemo_lossfree.integrations.bridge.pretrain)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.train_iters=20 lossfree.update_rate=1e-3")
    g = p.add_argument_group("layout (default: the config's cluster: section)")
    g.add_argument("--nodes", type=int, default=None)
    g.add_argument("--gpus-per-node", type=int, default=None, help="0: run on CPUs with gloo")
    g.add_argument("--ntasks-per-node", type=int, default=None,
                   help="CPUs: ranks per node; GPUs: 1 (torchrun) or --gpus-per-node (one task per GPU)")
    g.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="torchrun (one per node) or srun (one task per rank); default: torchrun on GPUs, srun on CPUs")
    g = p.add_argument_group("SLURM")
    g.add_argument("--job-name", default="nemo-lossfree")
    g.add_argument("--account", default=None)
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    g.add_argument("--container-image", default=None, help="pyxis/enroot image for the ranks")
    g.add_argument("--container-mounts", default=None, help="pyxis mounts, e.g. /lustre:/lustre")
    g.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit: checkpoint and requeue (default %(default)s)")
    g.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="stop with a checkpoint on USR1 but do not requeue")
    g.add_argument("--max-requeues", type=int, default=20, help="(default %(default)s)")
    g.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default %(default)s)")
    g.add_argument("--python", default=None,
                   help="interpreter on the nodes (default: this one for CPU jobs, `python` for GPU jobs)")
    p.add_argument("--output-dir", default=None,
                   help="job directory: script, logs, results, checkpoints (default: runs/slurm/<job-name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    mode.add_argument("--wait", action="store_true",
                      help="wait until the job ends (through requeues); exit with its exit code")
    p.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after this many seconds")
    return p


def _layout_value(cli_value, cluster: dict, key: str, default):
    if cli_value is not None:
        return cli_value
    value = cluster.get(key)
    return default if value is None else value


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], SlurmJob, Path]:
    """``(config, job fields, layout, job directory)``: the flags checked, no command built yet."""
    from nemo_lossfree.apps.slurm import payload

    config = payload.load_config(args.config, args.overrides)
    cluster = config.get("cluster") or {}
    nodes = _layout_value(args.nodes, cluster, "nodes", 1)
    gpus = _layout_value(args.gpus_per_node, cluster, "gpus_per_node", 0)
    # The config's tasks per node belong to its own GPU count: a GPU count
    # given here starts from that count's default layout instead.
    ntasks = args.ntasks_per_node
    if ntasks is None and args.gpus_per_node is None:
        ntasks = cluster.get("tasks_per_node")
    out_dir = Path(args.output_dir or Path("runs") / "slurm" / args.job_name).resolve()
    common = dict(
        nodes=nodes, gpus_per_node=gpus, ntasks_per_node=ntasks, launcher=args.launcher,
        job_name=args.job_name, account=args.account, partition=args.partition, time=args.time,
        container_image=args.container_image, container_mounts=args.container_mounts,
        log_dir=str(out_dir / "logs"), workdir=os.getcwd(), signal_seconds=args.signal_seconds,
        requeue=args.requeue, max_requeues=args.max_requeues, master_port=args.master_port,
    )
    # The flags' own rules (SlurmJob) before the config's: the layout is needed for both.
    layout = SlurmJob(command=["-c", "pass"], **common)
    if layout.gpus_per_node and not args.recipe:
        raise ValueError(
            "--recipe: GPU jobs run nemo_lossfree.integrations.bridge.pretrain, which needs the Megatron-Bridge "
            "recipe this config completes (a name in megatron.bridge.recipes, e.g. "
            "deepseek_v3_pretrain_config, or module:function)"
        )
    return config, common, layout, out_dir


def with_layout(config: dict[str, Any], layout: SlurmJob) -> dict[str, Any]:
    """The config as the job runs it: its ``cluster:`` section is the job's layout (flags win)."""
    merged = dict(config)
    merged["cluster"] = {"nodes": layout.nodes, "gpus_per_node": layout.gpus_per_node,
                         "tasks_per_node": layout.procs_per_node}
    return merged


def build_job(args: argparse.Namespace, config: dict[str, Any], common: dict[str, Any],
              layout: SlurmJob, out_dir: Path) -> tuple[SlurmJob, Optional[dict[str, Any]]]:
    """The job (the layout plus the training command: Bridge on GPUs, the demo worker on CPUs)
    and, for CPU jobs, the resolved run config the job reads (written next to the script)."""
    from nemo_lossfree.apps.slurm import payload

    if layout.gpus_per_node:
        command = payload.gpu_pretrain_command(args.config, args.overrides, config, recipe=args.recipe)
        return SlurmJob(command=command, python=args.python or "python", **common), None
    run_config = with_layout(config, layout)
    checkpoint_dir = (config.get("checkpoint") or {}).get("save") or str(out_dir / "checkpoints")
    command = payload.cpu_worker_command(
        run_config, config_file=str(out_dir / payload.RUN_CONFIG_FILE), results_dir=str(out_dir / "results"),
        checkpoint_dir=str(Path(checkpoint_dir).resolve()),
    )
    python = args.python or payload.default_python()
    return SlurmJob(command=command, python=python, **common), run_config


def run(args: argparse.Namespace) -> int:
    from nemo_lossfree.apps.slurm import submit as slurm
    from nemo_lossfree.apps.slurm.render import render_sbatch

    try:
        config, common, layout, out_dir = prepare(args)
        # Before validating (it imports Megatron-Core to build its TransformerConfig: seconds):
        # a bad --output-dir costs nothing. Created only at the end.
        check_output_dir(out_dir, "--output-dir", create=False)
    except ValueError as exc:  # a RunConfigError too: it names the key, or --config and the file
        print(f"{PREFIX}{exc}", file=sys.stderr)
        return EXIT_USAGE
    problems, _ = validate(with_layout(config, layout), prefix=PREFIX)
    if problems:
        given = " ".join(f"{flag} {getattr(args, name)}" for flag, name in LAYOUT_FLAGS
                         if getattr(args, name) is not None)
        print(f"{PREFIX}{args.config}: {len(problems)} problem(s){' with ' + given if given else ''}; "
              "nothing written or submitted", file=sys.stderr)
        return EXIT_USAGE
    try:
        job, run_config = build_job(args, config, common, layout, out_dir)
        script_path = out_dir / f"{job.job_name}.sbatch"
        text = render_sbatch(
            job, title=f"nemo-lossfree: {args.config}", submit_hint=f"Submit with: sbatch {script_path}"
        )
        # Last, since it creates the directory (unless --dry-run).
        check_output_dir(out_dir, "--output-dir", create=not args.dry_run)
    except ValueError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(text, end="")
        return 0
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    if run_config is not None:
        from nemo_lossfree.apps.slurm.payload import RUN_CONFIG_FILE
        from nemo_lossfree.runconfig.load import save_run_config

        save_run_config(run_config, out_dir / RUN_CONFIG_FILE)
    script_path.write_text(text)
    script_path.chmod(0o755)
    try:
        job_id = slurm.submit(str(script_path))
    except slurm.SlurmError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr)
        return EXIT_FAILED
    log = out_dir / "logs" / f"{job.job_name}-{job_id}.out"
    print(f"submitted job {job_id}: script {script_path}, log {log}", flush=True)
    if not args.wait:
        return 0

    def report(info: slurm.JobInfo) -> None:
        print(f"job {job_id}: {info.state} (restarts {info.restarts})", flush=True)

    try:
        info = slurm.wait(job_id, timeout_s=args.wait_timeout, on_change=report)
    except slurm.SlurmError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {job_id}: {info.state}, exit code {info.exit_code}, restarts {info.restarts}; log {log}")
    if info.state != "COMPLETED":
        return info.exit_code or 1
    return info.exit_code
