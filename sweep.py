"""Sweeps over the papers' grids, on this machine or on a SLURM cluster, and summaries of their results.
A tool around the method files (they never import it).

    python sweep.py run --methods zsclip coop --datasets eurosat dtd --shots 1 2 4 8 16 --seeds 1 2 3 \\
        --protocol fewshot [--launcher local|slurm ...] -- --backbone ViT-B-16 --cache-dir /shared/cache
    python sweep.py summarize runs/

A grid is methods x datasets x shots x seeds under one protocol. Each run is the command line a user
would type (`python coop.py --dataset D --shots K --seed S --protocol P --output RUNS <flags after -->`),
run as a subprocess, so its log shows exactly what ran. A run whose results.json exists is skipped, when
the sweep is planned and again just before the run starts: re-running the same command (or a job that
SLURM requeued) runs only what is missing. Methods write results.json atomically, so an interrupted run
leaves none behind and simply starts again.

How the grid becomes jobs, so that the image tower's work is shared through the feature cache:
  * first pass: zero-shot CLIP (method `zsclip`), one run per dataset. It trains nothing and its result
    depends on neither the shot count nor the seed; it encodes exactly the dataset's test set, which
    every later run of that dataset and tower then reads from the cache instead of encoding it again.
  * second pass: one job per (dataset, shots, seed) running its methods one after the other. They train
    on the same few-shot images, and the augmented view k of an image is the same crop for every method,
    so the views the first method encodes are cache hits for the next ones. A method applied to another's
    trained prompt (EMPL to CoOp's: STARTS_FROM) runs after it, with --init-from its prompt.pt.
Launchers: `local` runs the jobs here, one at a time (or --jobs N at once); `slurm` submits each pass as
one job array through submitit, the second pass waiting for the first (--dependency=afterany).
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common

HERE = Path(__file__).resolve().parent

# sweep name -> (method file, its flags); results land in RUNS/<sweep name>/...
METHODS = {
    "zsclip": ("coop.py", ["--zero-shot"]),  # zero-shot CLIP with CoOp's dataset template
    "coop": ("coop.py", []),
    "cocoop": ("cocoop.py", []),
    "kdpl": ("kdpl.py", []),  # KDPL on its CoOp student
    "kdpl_ca": ("kdpl.py", ["--class-agnostic"]),
    "kdpl_cocoop": ("kdpl.py", ["--student", "cocoop"]),
    "kdpl_ca_cocoop": ("kdpl.py", ["--student", "cocoop", "--class-agnostic"]),
    "vpt": ("vpt.py", []),
    "maple": ("maple.py", []),
    "kdpl_vpt": ("kdpl.py", ["--student", "vpt"]),
    "kdpl_maple": ("kdpl.py", ["--student", "maple"]),
    "promptsrc": ("promptsrc.py", []),
    "kdpl_promptsrc": ("kdpl.py", ["--student", "promptsrc"]),
    "mopd": ("mopd.py", []),
    "demul": ("demul.py", []),
    "empl": ("empl.py", []),  # started from the job's CoOp run (see plan)
}
# method -> the method whose trained prompt it starts from, run before it in the same job (the EMPL paper applies
# EMPL to a trained CoOp prompt)
STARTS_FROM = {"empl": "coop"}
# CoOp's 11 datasets: the papers' averages are over these
ELEVEN = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
          "sun397", "dtd", "eurosat", "ucf101"]
# flags the sweep sets in every command, or that would file the results under another method
SWEEP_FLAGS = ("--dataset", "--shots", "--seed", "--seeds", "--protocol", "--output", "--zero-shot",
               "--class-agnostic", "--student", "--init-from")
# settings that say where and how a run ran, not what it computed: a finished run may differ in them
PLACE_SETTINGS = {"output", "cache_dir", "data_root", "no_download", "workers", "device", "overwrite", "seed", "seeds"}
STOP = threading.Event()  # set on Ctrl-C: the local launcher's jobs start no further run


# --------------------------------------------------------------------------------------------------
# Summaries:  python sweep.py summarize RUNS_DIR
# --------------------------------------------------------------------------------------------------
def load_results(runs_dir):
    """Every results.json under runs_dir, as dicts."""
    found = sorted(Path(runs_dir).rglob("results.json"))
    if not found:
        raise common.UserError(f"no results.json under {runs_dir}: run a method first, or check the path")
    return [read_result(p) for p in found]


def read_result(path):
    """A results.json a run wrote; one that cannot be read (damaged since) is one message saying what to do."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON (truncated), or not UTF-8
        why = err.strerror if isinstance(err, OSError) else f"not a complete results file ({err})"
        raise common.UserError(f"cannot read {path}: {why}. Delete it and run the sweep again: it reruns that "
                               f"run") from None


def _cell(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f} ({len(values)})"


def _weights(result):
    return "RANDOM weights (meaningless)" if result["weights"] == "random" else result["weights"]


def _row(result):
    """A table row: the method, and for EMPL the test its accuracy comes from (transductive or not)."""
    test = result.get("chains", {}).get("test_condition")
    return f"{result['method']} (test: {test})" if test else result["method"]


def _methods_in_order(methods):
    return sorted(methods, key=lambda m: (m != "zsclip", m))  # the zero-shot baseline row first


def summary_tables(results):
    """Markdown tables, one per (dataset, protocol, backbone, weights): rows are methods; columns are
    shot counts (few-shot) or base / new / H (base-to-new; H from the averaged base and new). Cells:
    mean ± std over seeds (number of seeds). Then the average over CoOp's 11 datasets where they are all
    present (`average_tables`). Returns {title: (markdown, curves)}."""
    groups = {}
    for r in results:
        groups.setdefault((r["dataset"], r["protocol"], r["backbone"], _weights(r)), []).append(r)
    tables = {}
    for (dataset, protocol, backbone, weights), runs in sorted(groups.items()):
        title = f"{dataset} · {protocol} · {backbone} · {weights}"
        by = {}
        for r in runs:
            by.setdefault((_row(r), r["shots"]), []).append(r["metrics"])
        methods = _methods_in_order({m for m, _ in by})
        shots = sorted({k for _, k in by})
        curves = {}
        if protocol == "base2new":
            lines = ["| method | shots | base | new | H |", "|---|---|---|---|---|"]
            for m in methods:
                for k in shots:
                    if (m, k) in by:
                        base = [x["base"] for x in by[m, k]]
                        new = [x["new"] for x in by[m, k]]
                        h = common.harmonic_mean(np.mean(base), np.mean(new))
                        lines.append(f"| {m} | {k} | {_cell(base)} | {_cell(new)} | {h:.2f} |")
        else:
            lines = ["| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
            for m in methods:
                cells = [_cell([x["accuracy"] for x in by[m, k]]) if (m, k) in by else "—" for k in shots]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
                curves[m] = [(k, np.mean([x["accuracy"] for x in by[m, k]]), np.std([x["accuracy"] for x in by[m, k]]))
                             for k in shots if (m, k) in by]
        tables[title] = ("\n".join(lines), curves)
    tables.update(average_tables(results))
    return tables


def average_tables(results):
    """The papers' "average over 11 datasets", one table per (protocol, backbone, weights): a row per
    method and shot count whose results cover all of CoOp's 11 datasets (a partial average would not be
    comparable with the papers', so there is none). Per dataset the mean over seeds, then the mean over
    the datasets; base-to-new H from the averaged base and new (KgCoOp issue #9), never a mean of H."""
    groups = {}
    for r in results:
        if r["dataset"] in ELEVEN:
            key = (r["protocol"], r["backbone"], _weights(r))
            per_dataset = groups.setdefault(key, {}).setdefault((_row(r), r["shots"]), {})
            per_dataset.setdefault(r["dataset"], []).append(r["metrics"])
    tables = {}
    for (protocol, backbone, weights), by in sorted(groups.items()):
        complete = {mk: per_dataset for mk, per_dataset in by.items() if set(per_dataset) == set(ELEVEN)}
        if not complete:
            continue

        def average(mk, metric):
            return float(np.mean([np.mean([x[metric] for x in runs]) for runs in complete[mk].values()]))

        methods = _methods_in_order({m for m, _ in complete})
        shots = sorted({k for _, k in complete})
        curves = {}
        if protocol == "base2new":
            lines = ["| method | shots | base | new | H |", "|---|---|---|---|---|"]
            for m, k in [(m, k) for m in methods for k in shots if (m, k) in complete]:
                base, new = average((m, k), "base"), average((m, k), "new")
                lines.append(f"| {m} | {k} | {base:.2f} | {new:.2f} | {common.harmonic_mean(base, new):.2f} |")
        else:
            lines = ["| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
            for m in methods:
                cells = [f"{average((m, k), 'accuracy'):.2f}" if (m, k) in complete else "—" for k in shots]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
                curves[m] = [(k, average((m, k), "accuracy"), 0.0) for k in shots if (m, k) in complete]
        tables[f"average over the 11 datasets · {protocol} · {backbone} · {weights}"] = ("\n".join(lines), curves)
    return tables


def plot_curves(title, curves, path):
    """Few-shot curve: accuracy vs shots, one line per method, error bars = std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ks, means, stds = zip(*points)
        if method == "zsclip":
            ax.axhline(means[0], color="gray", linestyle="--", label="zero-shot CLIP")
        else:
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        common.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def summarize(runs_dir, out=None):
    """Print the tables, write summary.md and one few-shot curve PNG per table into `out` (runs_dir)."""
    out = Path(out or runs_dir)
    sections = []
    for title, (table, curves) in summary_tables(load_results(runs_dir)).items():
        sections.append(f"### {title}\n\n{table}\n")
        if curves:
            name = "curve_" + "".join(c if c.isalnum() else "_" for c in title) + ".png"
            plot_curves(title, curves, out / name)
            sections.append(f"![{title}]({name})\n")
    text = "\n".join(sections)
    common.write_atomic(out / "summary.md", lambda tmp: tmp.write_text(text))
    print(text)
    return text


# --------------------------------------------------------------------------------------------------
# The grid: runs and jobs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run of the grid: the command, where its results and its log go, and the folder it runs in."""
    method: str
    where: str       # "eurosat base2new 16-shot seed 1"
    command: tuple
    results: Path
    log: Path
    cwd: str         # the sweep's working directory: relative paths in the flags mean the same in a job

    @property
    def name(self):
        return f"{self.method} {self.where}"

    def done(self):
        if self.method == "zsclip":  # no training: the result of any shot count or seed is the result
            return any(self.results.parents[2].glob("shots_*/seed_*/results.json"))
        return self.results.exists()


def make_run(method, dataset, protocol, shots, seed, output, extra):
    script, flags = METHODS[method]
    where = argparse.Namespace(output=output, dataset=dataset, protocol=protocol, shots=shots)
    if method in STARTS_FROM:  # the prompt.pt of the same job's run of that method
        flags = [*flags, "--init-from", str(common.run_dir(where, STARTS_FROM[method], seed) / "prompt.pt")]
    cmd = (sys.executable, str(HERE / script), "--dataset", dataset, "--shots", str(shots), "--seed", str(seed),
           "--protocol", protocol, "--output", output, *flags, *extra)
    log = Path(output) / "logs" / method / dataset / protocol / f"shots_{shots}_seed_{seed}.log"
    return Run(method, f"{dataset} {protocol} {shots}-shot seed {seed}", cmd,
               common.run_dir(where, method, seed) / "results.json", log, os.getcwd())


def plan(methods, datasets, shots, seeds, protocol, output, extra):
    """The whole grid as two passes of jobs, a job being runs done one after the other (module docstring):
    [[zero-shot run] per dataset], [[the other methods' runs] per (dataset, shots, seed)]."""
    output = str(Path(output).absolute())  # jobs may start elsewhere
    trained = [m for m in methods if m != "zsclip"]
    for method, before in STARTS_FROM.items():  # a method started from another's prompt runs after it, in its job
        if method in trained and before not in trained[:trained.index(method)]:
            trained = [m for m in trained if m != before]
            trained.insert(trained.index(method), before)
    first = [[make_run("zsclip", d, protocol, min(shots), min(seeds), output, extra)]
             for d in datasets if "zsclip" in methods]
    second = [[make_run(m, d, protocol, k, s, output, extra) for m in trained]
              for d in datasets for k in shots for s in seeds] if trained else []
    return [first, second]


def missing(passes):
    """The same passes without finished runs, and without jobs or passes left empty."""
    passes = [[[run for run in job if not run.done()] for job in jobs] for jobs in passes]
    return [[job for job in jobs if job] for jobs in passes if any(jobs)]


def check_flags(extra, runs):
    """Flags after -- are refused here, once, rather than in every job of an array hours later: the
    sweep's own flags, and anything the method's own parser rejects (each run's full command is parsed)."""
    for token in extra:
        name = token.split("=")[0]
        taken = [flag for flag in SWEEP_FLAGS if len(name) > 2 and flag.startswith(name)]  # argparse takes prefixes
        if token.startswith("--") and taken:
            raise common.UserError(f"{token} after --: the sweep sets {taken[0]} itself; use the sweep's --methods, "
                                   f"--datasets, --shots, --seeds, --protocol and --output instead")
        if token.startswith("--") and len(name) > 2 and "--load-prompt".startswith(name):
            raise common.UserError(f"{token} after --: a sweep trains its prompts; evaluate a saved one with the "
                                   f"method's own file (python coop.py --load-prompt FILE ...)")
    for run in runs:
        script = Path(run.command[1])
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                asked = importlib.import_module(script.stem).parse_args(list(run.command[2:]))
        except SystemExit:
            reason = (stderr.getvalue().strip().splitlines() or ["invalid flags"])[-1]  # argparse's "error:" line
            raise common.UserError(f"{script.name} refuses the command of {run.name}: {reason}") from None
        if run.method != "zsclip" and run.results.exists():
            check_finished(run, asked)


def check_finished(run, asked):
    """A finished run is skipped only if it computed what this sweep asks for: the results path does not
    hold the backbone, weights or epochs, and a sweep into the same --output with other flags after --
    would otherwise report another configuration's numbers as its own."""
    found = read_result(run.results).get("config", {})
    asked = json.loads(json.dumps(vars(asked), default=str))
    for config in (found, asked):  # --init-from points into --output, a place: compare it as seen from there
        start, root = config.get("init_from"), config.get("output", "")
        if start and Path(start).is_relative_to(root):
            config["init_from"] = str(Path(start).relative_to(root))
    differ = [k for k in asked if k not in PLACE_SETTINGS and k in found and found[k] != asked[k]]
    if differ:
        what = ", ".join(f"--{k.replace('_', '-')} {found[k]} (this sweep: {asked[k]})" for k in differ[:3])
        raise common.UserError(f"{run.results} was made with other settings: {what}. Give this sweep another "
                               f"--output, or move those results away")


# --------------------------------------------------------------------------------------------------
# Running jobs: here, or as submitit jobs
# --------------------------------------------------------------------------------------------------
def execute(run, echo=True):
    """Run one command unless its results exist. Its output is appended to the run's log (a requeued
    run's earlier attempt stays readable) and, with echo, passed on to this process's output (a job's
    log shows its runs in full). Returns the run's status."""
    if run.done():
        return "skipped (results exist)"
    if STOP.is_set():
        return "not started (interrupted)"
    line = "$ " + shlex.join(run.command)
    print(line, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # logs follow the run as it goes
    try:
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "a") as log:
            log.write(line + "\n")
            log.flush()
            proc = subprocess.Popen(run.command, cwd=run.cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            try:
                for out in proc.stdout:
                    log.write(out)
                    if echo:
                        sys.stdout.write(out)
                code = proc.wait()
            finally:
                if proc.poll() is None:  # we were interrupted (Ctrl-C, a job's end, a full disk): the run
                    proc.kill()          # must not outlive us
                    proc.wait()
            log.write(f"[sweep] exit code {code}\n")
    except OSError as err:  # the log is the one file written here (appended: an earlier attempt stays readable)
        raise common.UserError(common.cannot_write(run.log, err)) from None
    return "ok" if code == 0 else f"failed (exit {code})"


class SweepJob:
    """One job: its runs one after the other. This is what submitit pickles and a cluster job runs."""

    def __init__(self, runs, echo=True):
        self.runs, self.echo = runs, echo

    def __call__(self):
        return [(run, execute(run, self.echo)) for run in self.runs]

    def checkpoint(self, *args, **kwargs):
        """submitit calls this when the job is preempted or about to time out, and requeues what it returns:
        the same job. Its finished runs are then skipped and the interrupted one starts again from the
        beginning (results.json and the feature cache are replaced atomically: nothing half-written is left)."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def describe(job):
    return f"{job[0].where}: " + " ".join(run.method for run in job)


def run_local(passes, jobs=1):
    """The jobs on this machine, `jobs` at a time (each job's runs in order); one pass after the other."""
    statuses = []
    STOP.clear()  # a Ctrl-C ended an earlier sweep of this process, not this one
    for pass_jobs in passes:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(SweepJob(runs, echo=jobs == 1)) for runs in pass_jobs]
            try:
                done = [future.result() for future in futures]
            except BaseException:  # a Ctrl-C (the running runs got it as well), a log that cannot be written
                STOP.set()  # no job starts another run
                raise
        statuses += [(run, status, run.log) for job in done for run, status in job]
    return statuses


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise common.UserError("--launcher slurm needs submitit: pip install 'submitit>=1.5' "
                               "(it is in requirements.txt)") from None
    return submitit


def check_slurm():
    absent = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if absent:
        raise common.UserError(f"--launcher slurm: {' and '.join(absent)} not found on PATH, so there is no SLURM "
                               f"cluster to submit to from here. Run the sweep on a login node of the cluster, or "
                               f"use --launcher local")


def array_id(jobs):
    return jobs[0].job_id.split("_")[0]  # an array's tasks are ARRAYID_INDEX; a lone job is just its id


def run_submitit(passes, args, cluster="slurm"):
    """Submit each pass as one job array through submitit (cluster "slurm"; "local" is submitit's
    LocalExecutor: the same pickled jobs as processes on this machine, which is how the tests run them).
    With wait (always for "local") returns the runs' statuses once every job has ended; else None."""
    submitit = import_submitit()
    # jobs unpickle SweepJob from this file's folder, wherever they start (sbatch and the local executor
    # both pass the environment on)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    folder = Path(args.output).absolute() / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(name="prompt-sweep", timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus_per_job,
                               cpus_per_task=args.slurm_cpus_per_job, slurm_partition=args.slurm_partition,
                               slurm_array_parallelism=args.slurm_array_parallelism)
    submitted, statuses, collected = [], [], 0  # (jobs, their runs) per pass; passes already waited for
    for pass_jobs in passes:
        after = ""
        if submitted and cluster == "slurm":  # the second pass starts once the first has ended, however it ended
            executor.update_parameters(slurm_dependency=f"afterany:{array_id(submitted[-1][0])}")
            after = f", starting after job {array_id(submitted[-1][0])} ends"
        elif submitted:  # the local executor knows no dependencies: wait here
            statuses += collect(*submitted[-1])
            collected = len(submitted)
        try:
            with executor.batch():
                jobs = [executor.submit(SweepJob(runs)) for runs in pass_jobs]
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as err:
            raise common.UserError(f"submitting the jobs failed: {str(err).strip()}") from None
        what = "zero-shot CLIP, encoding each test set once" if pass_jobs[0][0].method == "zsclip" else \
            "one job per dataset, shots and seed"
        ids = jobs[0].job_id if len(jobs) == 1 else f"{jobs[0].job_id} .. {jobs[-1].job_id}"
        print(f"submitted {len(jobs)} job(s) ({what}){after}: {ids}")
        for job, runs in zip(jobs, pass_jobs):
            print(f"  {job.job_id}  {describe(runs)}")
        submitted.append((jobs, pass_jobs))
    logs = Path(args.output).absolute() / "logs"
    print(f"job logs: {folder.parent}/<job id>/ (submitit), one log per run under {logs}/")
    if not args.wait and cluster == "slurm":
        return None
    return statuses + [status for jobs, pass_jobs in submitted[collected:] for status in collect(jobs, pass_jobs)]


def job_error(err):
    """The line that says why a job died. submitit's FailedJobError is a header, the job's traceback between
    two rules of dashes, then the paths of the job's logs: the traceback's last line is the error. Others
    (a job that left no result: its log's tail): their last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    if len(rules) >= 2 and rules[-1] > rules[-2] + 1:
        return lines[rules[-1] - 1][:200]
    return (lines or [type(err).__name__])[-1][:200]


def collect(jobs, pass_jobs):
    """Wait for the jobs; the status of each of their runs. A job that died (killed, out of time and not
    requeued) reports its unfinished runs with the job's own log."""
    statuses = []
    for job, runs in zip(jobs, pass_jobs):
        try:
            statuses += [(run, status, run.log) for run, status in job.result()]
        except Exception as err:  # whatever ended the job, the runs' results.json files say what was done
            reason = job_error(err)
            statuses += [(run, "ok" if run.done() else f"failed (job {job.job_id}: {reason})", job.paths.stderr)
                         for run in runs]
    return statuses


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parser():
    p = argparse.ArgumentParser(description="Sweeps over methods x datasets x shots x seeds, and summaries of "
                                            "their results.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="markdown tables + few-shot curves from every results.json under RUNS_DIR")
    s.add_argument("runs_dir")
    s.add_argument("--out", help="where summary.md and the PNGs go (default: RUNS_DIR)")
    r = sub.add_parser("run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="run a grid, skipping finished runs (resumable); flags after -- go to every run, "
                            "e.g. -- --backbone RN50 --data-root DIR --cache-dir /shared/cache")
    r.add_argument("--methods", nargs="+", default=["zsclip", "coop"], choices=list(METHODS), metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (zsclip: zero-shot CLIP, one run per dataset, run first)")
    r.add_argument("--datasets", nargs="+", default=["eurosat"], type=common.dataset_arg, metavar="DATASET",
                   help="dataset names as data.py knows them (the papers' averages need CoOp's 11)")
    r.add_argument("--shots", type=_positive, nargs="+", default=[1, 2, 4, 8, 16], help="shot counts")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (CoOp's: 1 2 3)")
    r.add_argument("--protocol", default="fewshot", choices=["fewshot", "base2new"],
                   help="passed to every run (the methods' own defaults differ)")
    r.add_argument("--output", default="runs", help="root folder of the results (and of the logs)")
    r.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: the runs here, as subprocesses; slurm: job arrays through submitit")
    r.add_argument("--jobs", type=_positive, default=1, help="local: jobs (a dataset/shots/seed's runs) at once")
    g = r.add_argument_group("SLURM (--launcher slurm)")
    g.add_argument("--slurm-partition", help="partition; none: the cluster's default")
    g.add_argument("--slurm-gpus-per-job", type=int, default=1, help="GPUs per job (its runs use one)")
    g.add_argument("--slurm-cpus-per-job", type=_positive, default=8,
                   help="CPUs per job, for image decoding (the methods' --workers is at most 8 by default)")
    g.add_argument("--slurm-time", type=_positive, default=120, help="minutes per job (a job runs one dataset/"
                                                                     "shots/seed's methods)")
    g.add_argument("--slurm-array-parallelism", type=_positive, default=256, help="jobs of an array running at once")
    g.add_argument("--wait", action="store_true", help="wait for the jobs, then list each run's outcome")
    return p


def run_grid(args, extra, cluster="slurm"):
    """`sweep.py run`: plan, skip what is done, run or submit the rest. Returns the number of failed runs.
    cluster: submitit's executor for --launcher slurm ("local" in the tests: the same jobs, run here)."""
    methods, datasets, shots, seeds = (list(dict.fromkeys(x)) for x in (args.methods, args.datasets, args.shots,
                                                                           args.seeds))
    passes = plan(methods, datasets, shots, seeds, args.protocol, args.output, extra)
    for method, before in STARTS_FROM.items():
        if method in methods:
            print(f"{method} starts from the prompt.pt of {before}'s run of the same dataset, shots and seed: {before} "
                  f"runs first in each job" + ("" if before in methods else f" ({before} added to the grid)"))
    every_run = [run for jobs in passes for job in jobs for run in job]
    check_flags(extra, every_run)
    todo = missing(passes)
    todo_runs = [run for jobs in todo for job in jobs for run in job]
    print(f"grid: {len(every_run)} run(s); {len(every_run) - len(todo_runs)} with results (skipped); "
          f"{len(todo_runs)} to run in {sum(len(jobs) for jobs in todo)} job(s)")
    tried = [run for run in todo_runs if run.log.exists()]
    for run in tried:
        print(f"  ran before without results (failed, interrupted, or still running): {run.name}  log: {run.log}")
    if not todo:
        return 0
    if args.launcher == "slurm":
        if cluster == "slurm":
            check_slurm()
        statuses = run_submitit(todo, args, cluster)
        if statuses is None:
            print(f"when the jobs have ended: the same command submits whatever is missing; "
                  f"python sweep.py summarize {args.output} prints the tables")
            return 0
    else:
        statuses = run_local(todo, args.jobs)
    failed = [(run, status, log) for run, status, log in statuses if status.startswith("failed")]
    for run, status, log in statuses:
        print(f"{status:<24} {run.name}" + (f"  log: {log}" if status.startswith("failed") else ""))
    return len(failed)


def main(argv=None, cluster="slurm"):
    """cluster: submitit's executor behind --launcher slurm; "local" runs the same jobs on this machine
    (the tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # flags after -- belong to the runs
    args = parser().parse_args(argv[:cut])
    extra = tuple(argv[cut + 1:])
    try:
        if args.command == "summarize":
            if extra:
                raise common.UserError("summarize takes no flags after --")
            summarize(args.runs_dir, args.out)
            return
        failed = run_grid(args, extra, cluster)
    except common.UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the same command resumes the sweep (finished runs are skipped)")
    if failed:
        sys.exit(f"error: {failed} run(s) failed (logs above); the same command retries only what is missing")


if __name__ == "__main__":
    # run as the module `sweep`, not as __main__: submitit then pickles SweepJob by reference to this file,
    # which every job imports, instead of by value
    import sweep
    sweep.main()
