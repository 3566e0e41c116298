"""The `dapt` command: one subcommand per stage of the flow, plus `run` and `demo`.

A `DaptError` (bad config, missing file) is printed as one line without a
traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dapt.base import DaptError


def _experiment(args):
    from dapt.experiment import load_experiment

    experiment, _ = load_experiment(args.config)
    return experiment


def cmd_tokenizer_train(args) -> None:
    from dapt.launch.pipeline import train_tokenizer

    train_tokenizer(_experiment(args))


def cmd_tokenizer_eval(args) -> None:
    from dapt.launch.pipeline import evaluate_tokenizers

    evaluate_tokenizers(_experiment(args), [Path(p) for p in args.tokenizers])


def cmd_data_prepare(args) -> None:
    from dapt.launch.pipeline import prepare_data

    prepare_data(_experiment(args), as_json=args.json)


def cmd_data_inspect(args) -> None:
    from dapt.launch.pipeline import inspect_stores

    inspect_stores(_experiment(args), args.sample, verify=args.verify)


def cmd_data_build(args) -> None:
    from dapt.launch.pipeline import build_stores

    experiment = _experiment(args)
    overrides = {key: value for key, value in (("executor", args.executor), ("tasks", args.tasks),
                                               ("workers", args.workers), ("ray_address", args.ray_address)) if value}
    build_stores(experiment, experiment.data.model_copy(update=overrides))


def cmd_mix_plan(args) -> None:
    from dapt.launch.pipeline import mix_plan

    mix_plan(_experiment(args))


def cmd_train(args) -> None:
    import gc

    from dapt.launch.pipeline import load_training_experiment
    from dapt.launch.preflight import checked_by_launcher, preflight
    from dapt.pretrain.train import train_one_after_another

    experiments = []
    for config in args.configs:  # every file is checked before the first run starts
        experiments.append(load_training_experiment(config))
        if not checked_by_launcher():  # started by hand or by a launcher that is not dapt's
            preflight(experiments[-1], Path(config), resume=not args.no_resume, wandb=os.environ.get("RANK", "0") == "0",
                      carried_over=True)
    # The runs share one process group: it waits as long as the most patient of them asks.
    timeout = max(experiment.train.dist_timeout_minutes for experiment in experiments)
    train_one_after_another([Path(config) for config in args.configs], resume=not args.no_resume,
                            timeout_minutes=timeout)
    # The interpreter's last garbage collection walks every object torch, DeepSpeed and
    # transformers made (~3 s on a CPU); nothing is left to release, so exit without it.
    gc.freeze()


def cmd_launch_local(args) -> None:
    from dapt.launch.local import default_nproc, run_local
    from dapt.pretrain.carry_over import carry_over_in_a_process
    from dapt.launch.pipeline import load_training_experiment
    from dapt.launch.preflight import preflight
    from dapt.workdir import workdir_lock

    experiment = load_training_experiment(args.config)
    with workdir_lock(experiment.workpath):
        preflight(experiment, Path(args.config), resume=not args.no_resume)
        carry_over_in_a_process(experiment, Path(args.config))
        run_local(Path(args.config), args.nproc or default_nproc(experiment), resume=not args.no_resume)


def cmd_launch_slurm(args) -> None:
    from dapt.launch.pipeline import load_training_experiment
    from dapt.launch.slurm import launch_slurm, slurm_options

    experiment = load_training_experiment(args.config)
    if not args.dry_run:
        from dapt.launch.preflight import preflight

        preflight(experiment, Path(args.config))  # on this host: nothing is submitted for a job that would fail
    flags = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "partition": args.partition,
             "account": args.account, "time": args.time}
    launch_slurm(experiment, Path(args.config), slurm_options(experiment, flags), dry_run=args.dry_run)


def cmd_launch_deepspeed(args) -> None:
    from dapt.launch.deepspeed_launcher import run_deepspeed
    from dapt.launch.pipeline import load_training_experiment
    from dapt.launch.preflight import preflight
    from dapt.pretrain.carry_over import carry_over_in_a_process

    # A bad experiment file, a missing store or tokenizer is reported here, not by every rank.
    experiment = load_training_experiment(args.config)
    preflight(experiment, Path(args.config), resume=not args.no_resume)
    carry_over_in_a_process(experiment, Path(args.config))
    run_deepspeed(Path(args.config), Path(args.hostfile), args.launcher, resume=not args.no_resume)


def cmd_export(args) -> None:
    from dapt.pretrain.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), tag=args.tag, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, lora=args.lora)
    print(f"exported a Hugging Face model directory to {out}")


def cmd_model_carry_over(args) -> None:
    from dapt.launch.pipeline import load_training_experiment
    from dapt.pretrain.carry_over import carry_over_base_model
    from dapt.workdir import workdir_lock

    experiment = load_training_experiment(args.config)
    if experiment.model.embeddings is None:
        print("model.embeddings is not set: the ranks load model.path as it is, nothing to carry over")
        return
    with workdir_lock(experiment.workpath):
        carry_over_base_model(experiment, Path(args.config))


def cmd_model_import_gguf(args) -> None:
    from dapt.pretrain.gguf import import_gguf

    out = import_gguf(Path(args.gguf_file), Path(args.out))
    print(f"wrote a Hugging Face model folder (weights, config, tokenizer) to {out}; use it as `model.path`")


def cmd_schema(args) -> None:
    import json

    from dapt.experiment import Experiment

    schema = json.dumps(Experiment.model_json_schema(), indent=1)
    if args.output:
        Path(args.output).write_text(schema + "\n")
        print(f"JSON Schema of the experiment file written to {args.output}")
    else:
        print(schema)


def cmd_eval(args) -> None:
    from dapt.pretrain.evaluate import evaluate_model_dir

    experiment = _experiment(args)
    model_dir = Path(args.model) if args.model else experiment.export_dir
    if args.tasks or args.records:
        from dapt.pretrain.tasks import evaluate_tasks, format_tasks, log_tasks, record_task

        records = [record_task(experiment, name, args.shots) for name in args.records or []]
        results = evaluate_tasks([Path(t) for t in args.tasks or []], model_dir, experiment.workpath, shots=args.shots,
                                 record_tasks=records)
        print(f"{format_tasks(results)}\nwritten to {experiment.workpath / 'eval_tasks.json'}")
        if model_dir.resolve() == experiment.export_dir.resolve():  # another model's scores are not the run's
            log_tasks(experiment, results)
        return
    for name, bpb in evaluate_model_dir(experiment, model_dir).items():
        print(f"{name:<14}held-out BPB {bpb:.4f}")


def cmd_report(args) -> None:
    from dapt.pretrain.report import build_report

    page = build_report(Path(args.path), Path(args.out) if args.out else None)
    print(f"report: {page} (plots beside it)")


def cmd_wandb_dashboard(args) -> None:
    from dapt.pretrain.dashboard import dashboard

    experiment = _experiment(args) if args.config else None
    project = args.project or (experiment and experiment.wandb.project)
    if not project:
        raise DaptError("dapt wandb dashboard: give --project, or --config with an experiment whose wandb.project is set")
    entity = args.entity or (experiment and experiment.wandb.entity)
    corpora = experiment.corpus_names() if experiment else []
    print(dashboard(project, entity, corpora, Path(args.output) if args.output else None, args.dry_run))


def cmd_run(args) -> None:
    from dapt.launch.pipeline import run_flow

    run_flow(Path(args.config), args.nproc, resume=not args.no_resume)


def cmd_sweep(args) -> None:
    from dapt.launch.sweep import run_sweep

    run_sweep(Path(args.config), only=args.only, nproc=args.nproc, slurm=args.slurm)


def cmd_demo(args) -> None:
    from dapt.launch.demo import prepare_demo
    from dapt.launch.pipeline import run_flow

    config = prepare_demo(Path(args.workdir), Path(args.base_model) if args.base_model else None)
    print(f"running: dapt run {config}", flush=True)
    run_flow(config, args.nproc, resume=not args.no_resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapt", description="Domain-adaptive pretraining.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name: str, handler, help_text: str, config: bool = True):
        sub = group.add_parser(name, help=help_text, description=help_text)
        if config:
            sub.add_argument("config", help="experiment YAML file")
        sub.set_defaults(handler=handler)
        return sub

    demo = command(commands, "demo", cmd_demo, "write the built-in demo corpora and run the whole flow on them", config=False)
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes everything (default: runs/demo)")
    demo.add_argument("--nproc", type=int, help="training processes (default: GPUs, or 2 on CPU)")
    demo.add_argument("--base-model", metavar="DIR",
                      help="continue pretraining this Hugging Face model (weights and tokenizer) instead of a tiny new one")
    run = command(commands, "run", cmd_run, "the whole flow: tokenizer, stores, mix plan, training, export")
    run.add_argument("--nproc", type=int, help="training processes (default: launch.nproc_per_node, GPUs, or 2)")

    sweep = command(commands, "sweep", cmd_sweep, "proxy runs over the mixes of the experiment's `sweep:` section; "
                    "BPB per mix, a fitted model and a proposed mix")
    sweep.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs of the sweep (names as listed)")
    sweep.add_argument("--nproc", type=int, help="processes per run (default: sweep.proxy.nproc, GPUs, or 2)")
    sweep.add_argument("--slurm", action="store_true",
                       help="submit the unfinished runs as one Slurm job array (options: sweep.proxy.slurm or launch.slurm)")

    tokenizer = commands.add_parser("tokenizer", help="tokenizer stages").add_subparsers(dest="sub", required=True, metavar="STAGE")
    command(tokenizer, "train", cmd_tokenizer_train, "train the experiment's tokenizer")
    tokenizer_eval = command(tokenizer, "eval", cmd_tokenizer_eval,
                             "tokenizers side by side on each corpus's held-out text: bytes/token, fertility, splits")
    tokenizer_eval.add_argument("tokenizers", nargs="*", help="tokenizer directories (default: the experiment's)")
    data = commands.add_parser("data", help="corpus stages").add_subparsers(dest="sub", required=True, metavar="STAGE")
    prepare = command(data, "prepare", cmd_data_prepare, "read and validate the corpora: documents read, kept, rejected by reason")
    prepare.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    build = command(data, "build", cmd_data_build, "read, validate, deduplicate and tokenise the corpora into token "
                    "stores (datatrove: local processes, a Slurm job array or a Ray cluster)")
    build.add_argument("--executor", choices=("local", "slurm", "ray"), help="default: the experiment's `data.executor`")
    build.add_argument("--tasks", type=int, help="parts the corpora are split into, by bytes (default: `data.tasks`)")
    build.add_argument("--workers", type=int, help="tasks running at once (default: `data.workers`)")
    build.add_argument("--ray-address", help="the Ray cluster to run on (default: `data.ray_address`)")
    inspect = command(data, "inspect", cmd_data_inspect, "statistics of the built stores, and decoded samples")
    inspect.add_argument("--sample", type=int, default=0, metavar="N", help="print N decoded documents per corpus")
    inspect.add_argument("--verify", action="store_true",
                         help="check every store file against the checksums written at build time, and the sources")
    mix = commands.add_parser("mix", help="mix stages").add_subparsers(dest="sub", required=True, metavar="STAGE")
    command(mix, "plan", cmd_mix_plan, "print samples, tokens and epochs per corpus for the run")

    train = command(commands, "train", cmd_train, "train on this rank (what launchers start on every process); "
                    "several experiment files train one after another in the same processes", config=False)
    train.add_argument("configs", nargs="+", metavar="config", help="experiment YAML file(s)")
    launch = commands.add_parser("launch", help="start training processes").add_subparsers(dest="sub", required=True, metavar="HOW")
    local = command(launch, "local", cmd_launch_local, "torchrun on this machine")
    local.add_argument("--nproc", type=int, help="processes (default: launch.nproc_per_node, GPUs, or 2)")
    slurm = command(launch, "slurm", cmd_launch_slurm,
                    "write an sbatch script (torchrun on every node, checkpoint and requeue before the time limit) "
                    "and submit it; defaults from launch.slurm")
    slurm.add_argument("--nodes", type=int, help="nodes (default: launch.slurm.nodes, or 1)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each (0: CPU nodes)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--time", help="time limit, e.g. 48:00:00")
    slurm.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    deepspeed = command(launch, "deepspeed", cmd_launch_deepspeed, "the deepspeed launcher over the hosts of a hostfile")
    deepspeed.add_argument("--hostfile", required=True, help="MPI-style hostfile: one `<host> slots=<processes>` per line")
    deepspeed.add_argument("--launcher", default="pdsh", choices=["pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm"],
                           help="how the deepspeed launcher reaches the hosts (default: pdsh over ssh)")
    for starts_training in (demo, run, train, local, deepspeed):
        starts_training.add_argument("--no-resume", action="store_true",
                                     help="start training afresh even when the workdir holds a checkpoint")
    for resumes in (demo, run, train, local, deepspeed, slurm):
        resumes.add_argument("--allow-changed", nargs="+", metavar="FIELD", default=[],
                             help="resume with these optimizer or schedule fields changed since the checkpoint "
                                  "(e.g. train.lr train.steps); other changes of them are refused")

    evaluate = command(commands, "eval", cmd_eval,
                       "held-out bits-per-byte per corpus of a Hugging Face model directory, or downstream few-shot tasks")
    evaluate.add_argument("--model", help="model directory (default: the experiment's export)")
    evaluate.add_argument("--tasks", nargs="+", metavar="TASK_YAML",
                          help="score few-shot classification tasks (lm-evaluation-harness) instead of held-out BPB")
    evaluate.add_argument("--records", nargs="+", metavar="CORPUS",
                          help="score the held-out records of prompt/completion corpora whose completions are labels: "
                               "accuracy and macro-F1 (lm-evaluation-harness)")
    evaluate.add_argument("--shots", type=int,
                          help="examples before each test item (default: each task's `shots`; records: none)")
    report = command(commands, "report", cmd_report, "an offline HTML page of a run or a sweep, plots embedded", config=False)
    report.add_argument("path", help="a run's workdir or a sweep folder")
    report.add_argument("--out", help="where report.html and its PNGs go (default: PATH/report)")
    wandb = commands.add_parser("wandb", help="Weights & Biases views").add_subparsers(dest="sub", required=True, metavar="WHAT")
    board = command(wandb, "dashboard", cmd_wandb_dashboard, "a saved W&B workspace with dapt's panels (wandb-workspaces)",
                    config=False)
    board.add_argument("--project", help="W&B project (default: the experiment's wandb.project)")
    board.add_argument("--entity", help="W&B entity (default: the experiment's, else your default entity)")
    board.add_argument("--config", help="experiment YAML: its corpora get their own panels")
    board.add_argument("--output", help="also write the workspace spec (JSON) here")
    board.add_argument("--dry-run", action="store_true", help="build and write the spec, do not save it to W&B")
    model = commands.add_parser("model", help="base model folders").add_subparsers(dest="sub", required=True, metavar="WHAT")
    command(model, "carry-over", cmd_model_carry_over,
            "carry the base model over to the experiment's tokenizer (model.embeddings), fit its new rows and measure "
            "the base model's held-out BPB, before any rank starts (dapt run and dapt launch do it first)")
    gguf = command(model, "import-gguf", cmd_model_import_gguf,
                   "turn a GGUF file (llama.cpp) into a Hugging Face model folder for `model.path`", config=False)
    gguf.add_argument("gguf_file", help="the .gguf file")
    gguf.add_argument("out", help="output folder")
    schema = command(commands, "schema", cmd_schema,
                     "the experiment file's JSON Schema, for editors that complete and check YAML", config=False)
    schema.add_argument("--output", help="write it here instead of printing it")
    export = command(commands, "export", cmd_export, "consolidate a DeepSpeed checkpoint into a Hugging Face directory", config=False)
    export.add_argument("checkpoint", help="checkpoint folder (holding `latest`)")
    export.add_argument("out", help="output directory")
    export.add_argument("--tag", help="checkpoint tag (default: the one `latest` names)")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help="precision of the weights (default: export.dtype, else the training precision)")
    export.add_argument("--max-shard-size", help="largest safetensors file, e.g. 2GB (default: export.max_shard_size, 5GB)")
    export.add_argument("--lora", choices=["merged", "adapter"],
                        help="a LoRA run: the base model with the adapters merged in, or peft's adapter folder "
                             "(default: export.lora, merged)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_changed", None):  # for this process and the ranks it starts
        from dapt.pretrain.resume_settings import ALLOW_CHANGED

        os.environ[ALLOW_CHANGED] = ",".join(args.allow_changed)
    try:
        args.handler(args)
    except DaptError as err:
        print(f"dapt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dapt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
