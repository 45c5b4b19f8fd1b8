"""Speed and memory of the shared machinery, for README's performance table (not a test).

Measures, for one backbone (random weights are fine: speed does not depend on the values):
  * image-tower feature extraction, images/s (real images of --dataset, CoOp's test transform);
  * CoOp's training step and epoch over cached features (text tower forward + backward every step);
  * the text-tower speed-up of cutting prompts after the last EOT token instead of running 77 tokens;
  * peak memory (CUDA: max allocated; CPU: max resident set size of the process);
  * with --methods, seconds per training epoch and per step of each method's own command line (two
    epochs on the real few-shot images; the test split gets placeholder features so that evaluation
    does not encode thousands of images: the accuracy of these runs is meaningless by construction);
  * with --empl-cost, only EMPL's training step and evaluation relative to CoOp's (see empl_cost);
  * with --empl-total, only CoOp + EMPL end to end through their command lines, CoOp first (see empl_total);
  * with --cocoop-cost, only CoCoOp's training step, evaluation and peak memory against CoOp's, for EuroSAT's
    10 classes and ImageNet's 1,000 (see cocoop_cost);
  * with --prompted-cost, only the training step of the prompted-tower students (VPT, MaPLe, PromptSRC) against the frozen
    tower's own forward and backward and against CoOp's step with the image pass (see prompted_cost);
  * with --gpu-check, every method once for real on --device (bf16 and fp16; see gpu_check): the prepared GPU
    check, which runs on the CPU too (--device cpu --backbone tiny);
  * with --memory, only memory: the peak resident memory of cold and warm coop.py runs loading the backbone
    from a weights file, and of each phase of such a run, the maximum of --memory-runs runs each (see memory);
  * with --grid, only the image-tower work of a small paper grid: passes made against the official code's,
    cold and then warm (see grid).

    python benchmark.py --backbone ViT-B-16 --data-root ../shared/data --images 256 --device cpu
    python benchmark.py --backbone ViT-B-16 --data-root ../shared/data --methods coop mopd kdpl demul empl
    python benchmark.py --backbone ViT-B-16 --data-root ../shared/data --empl-cost --repeats 2
    python benchmark.py --backbone ViT-B-16 --data-root ../shared/data --empl-total --empl-total-views 1 --repeats 2
    python benchmark.py --backbone ViT-B-16 --cocoop-cost --repeats 2
    python benchmark.py --backbone ViT-B-32 --prompted-cost --repeats 3
    python benchmark.py --gpu-check --data-root ../shared/data          # on a CUDA machine: ViT-B/16, < 8 min on an H100
    python benchmark.py --backbone ViT-B-32 --data-root ../shared/data --memory --images 1000
    python benchmark.py --backbone tiny --data-root ../shared/data --grid
"""
import argparse
import json
import math
import platform
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import torch

import cocoop
import common
import coop
import data
import empl
import maple
import promptsrc
import vpt


def padded_to_77(x):
    """The same prompts without the EOT cut: padded with the padding token's embedding to 77 positions."""
    return torch.cat([x, x[:, -1:].detach().expand(-1, 77 - x.shape[1], -1)], dim=1)


# Flags that make each method runnable in a benchmark on any machine (the paper's ViT-H/14 teacher or
# the OpenAI embedder would measure something else); the rest are each method's defaults.
METHOD_FLAGS = {"kdpl": ["--teacher", "{backbone}", "--teacher-pretrained", "none"],
                "demul": ["--llm", "minilm", "--pretrain-names", "1000"]}


# --------------------------------------------------------------------------------------------------
# Memory: peak resident set size of whole runs and of each phase of a run
# --------------------------------------------------------------------------------------------------
def rss_mb():
    """(current, peak since the last reset_peak) resident memory of this process, MB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def random_weights_file(backbone, root):
    """A checkpoint file of random weights, so that runs load from a file as offline users do."""
    path = root / f"{backbone}_random_weights.bin"
    if not path.exists():
        common.save_atomic(common.load_clip(backbone, "none").model.state_dict(), path)
    return path


def subset_root(args, root):
    """A data root whose split file keeps --images test images of --dataset, spread evenly over the split (which
    lists them class by class), images linked, not copied: memory does not grow with the number of test images,
    the run time does."""
    src = data.DATASETS[data.canonical_name(args.dataset)]
    if not args.images:
        return args.data_root
    if not src.split:
        raise SystemExit(f"--images {args.images}: {args.dataset} has no split file to cut; pass --images 0 (all)")
    split_file = Path(data._split_file(data.canonical_name(args.dataset), os.path.abspath(args.data_root), False))
    split = json.loads(split_file.read_text())
    split["test"] = split["test"][::max(1, len(split["test"]) // args.images)][:args.images]
    (root / src.folder).mkdir(parents=True, exist_ok=True)
    source = Path(args.data_root).resolve() / src.folder
    # the image folder, or every entry of the dataset's folder where the images lie in it (images="")
    for entry in [source / src.images] if src.images else [e for e in source.iterdir() if e.name != split_file.name]:
        link = root / src.folder / entry.relative_to(source)
        if not link.exists():
            link.symlink_to(entry)
    common.write_atomic(root / src.folder / split_file.name, lambda tmp: tmp.write_text(json.dumps(split)))
    return str(root)


def coop_argv(args, weights, data_root, cache, out):
    return ["--dataset", args.dataset, "--shots", str(args.shots), "--epochs", "3", "--backbone", args.backbone,
            "--pretrained", str(weights), "--data-root", data_root, "--no-download", "--cache-dir", str(cache),
            "--output", str(out), "--workers", str(args.workers), "--device", "cpu"]


def memory(args, root):
    """Peak resident memory (CPU) of coop.py loading --backbone from a weights file, --shots 16, 3 epochs, a
    fresh view every epoch: --memory-runs cold runs (each on an empty cache of its own) and as many warm ones (on
    the last cold run's filled cache), each a process of its own, and the phases of --memory-runs cold runs (each
    a fresh interpreter, the peak reset before each phase). Reported: every run's peak and the maximum, not the
    best: a figure must hold for every run, and identical runs have peaked at very different heights (where
    freed memory lands depends on the address-space layout, which changes from run to run; see
    common.MMAP_THRESHOLD)."""
    weights, data_root = random_weights_file(args.backbone, root), subset_root(args, root / "data")
    runs = {"cold": [], "warm": []}
    for i in range(args.memory_runs):
        runs["cold"].append(coop_run(args, weights, data_root, root, root / f"cache{i}", f"cold{i}"))
    for i in range(args.memory_runs):  # on the last cold run's cache, where every feature is
        runs["warm"].append(coop_run(args, weights, data_root, root, root / f"cache{args.memory_runs - 1}", f"warm{i}"))
    phases = [phases_run(args, data_root, root, i) for i in range(args.memory_runs)]
    return {"runs": {label: {"max_peak_mb": max(r["peak_mb"] for r in rs), "peaks_mb": [r["peak_mb"] for r in rs],
                             "seconds": [round(r["seconds"], 1) for r in rs]} for label, rs in runs.items()},
            "phases": {name: {key: max(p[name][key] for p in phases) for key in ("peak_mb", "after_mb")}
                       | {"peaks_mb": [p[name]["peak_mb"] for p in phases]} for name in phases[0]},
            "runs_each": args.memory_runs, "test_images": args.images or "all",
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "libc": " ".join(platform.libc_ver()), "versions": common.versions(),
            "weights_file_mb": weights.stat().st_size // 2**20}


# Runs a script as __main__ (argv: the file to write to, the script, its arguments) and writes the peak resident
# memory of its process (VmHWM, kB) when it exits. Not os.wait4's ru_maxrss: Linux carries the launching process's
# own high-water mark over the exec into it (this benchmark's, ~1.36 GB once it has made the ViT-B/32 weights file,
# which every warm run then reported), and a loader worker's counts the pages it shares with coop.py's process.
MAIN_PEAK = """import atexit, runpy, sys
def report(path=sys.argv[1]):
    with open(path, "w") as f:
        f.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
atexit.register(report)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def coop_run(args, weights, data_root, root, cache, label):
    """One coop.py run as a process of its own: the peak resident memory of that process (MB) and its seconds."""
    log, peak = root / f"{label}.log", root / f"{label}.peak_kb"
    with open(log, "w") as stderr:  # a file, not a pipe: a long run's progress bars would fill a pipe and block
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MAIN_PEAK, str(peak), "coop.py",
                               *coop_argv(args, weights, data_root, cache, root / f"runs_{label}")],
                              cwd=Path(__file__).resolve().parent, stdout=subprocess.DEVNULL, stderr=stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the {label} coop.py run failed: {log.read_text().strip().splitlines()[-1:]} ({log})")
    return {"peak_mb": int(peak.read_text()) // 1024, "seconds": time.perf_counter() - start}


def phases_run(args, data_root, root, i):
    """memory_phases in a fresh interpreter, on a cache of its own: {phase: {peak_mb, after_mb}}."""
    phases = subprocess.run([sys.executable, __file__, "--memory-phases", "--backbone", args.backbone, "--dataset",
                             args.dataset, "--shots", str(args.shots), "--data-root", data_root, "--workers",
                             str(args.workers), "--output", str(root), "--phases-dir", f"phases{i}"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if phases.returncode != 0:
        raise SystemExit(f"the phases run failed: {phases.stderr.strip().splitlines()[-3:]}")
    return json.loads(phases.stdout.strip().splitlines()[-1])


def memory_phases(args):
    """Run in a fresh interpreter by memory(): the peak of each phase of a cold coop.py run, in order, on
    memory()'s weights file (--output: memory()'s folder) and an empty cache of its own (--phases-dir)."""
    now, _ = rss_mb()
    phases = {"imports (torch, torchvision, open_clip)": {"peak_mb": now, "after_mb": now}}
    weights = Path(args.output) / f"{args.backbone}_random_weights.bin"
    root = Path(args.output) / args.phases_dir

    def phase(name, fn):
        reset_peak()
        value = fn()
        after, peak = rss_mb()
        phases[name] = {"peak_mb": peak, "after_mb": after}
        return value
    run_args = coop.parse_args(coop_argv(args, weights, args.data_root, root / "cache", root / "runs"))
    task = phase("load CLIP from the weights file, data", lambda: common.prepare(run_args, 1))
    phase("test features (cold)", lambda: [task.eval_features(ev) for ev in task.evals.values()])
    model = coop.CoOp(task.clip, task.classnames, 16)
    phase("training, 3 epochs (3 fresh views, cold)", lambda: task.fit([model.ctx], lambda f, y: coop.coop_loss(
        model, f, y)))
    phase("evaluation", lambda: task.evaluate(lambda names, feats: model.logits(feats, names)))
    print(json.dumps(phases))


# --------------------------------------------------------------------------------------------------
# A paper grid: image-tower passes made against the official code's
# --------------------------------------------------------------------------------------------------
GRID = {"methods": ["coop", "kdpl", "mopd", "demul", "empl"], "shots": [1, 16], "seeds": [1, 2]}


def grid(args, root):
    """Image-tower passes of a small paper grid on --dataset: methods x shots x seeds of GRID, --grid-epochs
    epochs with a fresh view every epoch (the official protocol), each method's default protocol, all runs
    sharing one feature cache, a (shots, seed)'s methods one after the other. The official code passes every
    training image through the tower in every epoch of every run (KDPL: through both towers) and the test
    set once per run. The target here: one pass per distinct (tower, image, view) and one test pass per
    (tower, dataset). KDPL's teacher is another random tower (tiny-wide, or ViT-L-14) with --teacher-eval off,
    as the official code never scores the teacher; DeMul uses --llm minilm. The grid then runs once more (warm),
    on the filled cache."""
    ds = data.load_dataset(args.dataset, args.data_root, download=False)
    teacher = {"tiny": "tiny-wide", "ViT-L-14": "ViT-B-16"}.get(args.backbone, "ViT-L-14")  # another tower
    flags = {"kdpl": ["--teacher", teacher, "--teacher-pretrained", "none", "--teacher-eval", "off"],
             "demul": ["--llm", "minilm", "--pretrain-names", "1000"]}
    runs, pairs, wall = {"cold": [], "warm": []}, set(), {}
    for label in ("cold", "warm"):  # warm: the same grid once more on the filled cache
        start = time.perf_counter()
        for shots in GRID["shots"]:
            for seed in GRID["seeds"]:
                for method in GRID["methods"]:
                    res = grid_run(args, root, f"{label}/{method}_{shots}_{seed}", ds, method, shots, seed,
                                   flags.get(method, []))
                    towers = [args.backbone, teacher] if method == "kdpl" else [args.backbone]
                    pairs |= {(t, rel, view) for t in towers for rel in res["train_images"]
                              for view in range(args.grid_epochs)}
                    runs[label].append({"method": method, "shots": shots, "seed": seed,
                                        "encoded": res["times"]["images_encoded"],
                                        "official": args.grid_epochs * len(res["train_images"]) * len(towers)
                                        + len(ds.test)})
        wall[label] = time.perf_counter() - start
    ours, warm = (sum(r["encoded"] for r in runs[label]) for label in ("cold", "warm"))
    official = sum(r["official"] for r in runs["cold"])
    target = len(pairs) + len(ds.test)  # the test set once through the student tower (the teacher never scores it)
    return {"grid": dict(GRID, epochs=args.grid_epochs, runs=len(runs["cold"]), backbone=args.backbone,
                         teacher=teacher),
            "image_passes": {"ours": ours, "ours_warm": warm, "official": official, "target": target,
                             "ours_vs_official": ours / official},
            "wall_s": wall, "per_run": runs["cold"]}


def grid_run(args, root, name, ds, method, shots, seed, flags):
    """One run of the grid as its own process, on the grid's shared cache; its results.json."""
    out = root / "runs" / name
    cmd = [sys.executable, f"{method}.py", "--dataset", ds.name, "--shots", str(shots), "--seed", str(seed),
           "--epochs", str(args.grid_epochs), "--backbone", args.backbone, "--pretrained", "none",
           "--data-root", args.data_root, "--no-download", "--cache-dir", str(root / "cache"),
           "--output", str(out), "--workers", str(args.workers), "--device", "cpu", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(next(out.rglob("results.json")).read_text())


def method_timings(args, ds, clip, device, root):
    """Seconds per epoch and per step of each method's command line, two epochs, one cached view."""
    cache = common.FeatureCache(root / "cache")
    cache.put(clip, ds.name, ds.test, "test", torch.randn(len(ds.test), clip.embed_dim))
    timings = {}
    for method in args.methods:
        flags = [f.format(backbone=args.backbone) for f in METHOD_FLAGS.get(method, [])]
        cmd = [sys.executable, f"{method}.py", "--dataset", ds.name, "--shots", str(args.shots), "--backbone",
               args.backbone, "--pretrained", "none", "--data-root", args.data_root, "--no-download", "--epochs",
               "2", "--aug-views", "1", "--protocol", "fewshot", "--device", str(device), "--precision",
               clip.precision, "--cache-dir", str(root / "cache"), "--output", str(root / "runs"), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        found = list((root / "runs" / method).rglob("results.json"))
        if proc.returncode != 0 or not found:
            timings[method] = {"error": proc.stderr.strip().splitlines()[-1:] or ["no results"]}
            continue
        res = json.loads(found[0].read_text())
        steps = res.get("train", {}).get("steps_per_epoch") or res.get("steps_per_epoch")
        epoch_s = res["times"]["training_s"] / 2
        timings[method] = {"epoch_s": epoch_s, "step_s": epoch_s / steps, "steps_per_epoch": steps,
                           "evaluation_s": res["times"]["evaluation_s"]}
    return timings


def interleaved(fns, repeats, device):
    """Median seconds of each fn() after one warm-up call each; the calls are interleaved, so the load of a
    shared machine drifts alike for all of them."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def empl_cost(args, ds, clip, device):
    """EMPL's training step and evaluation relative to CoOp's, in the base-to-new setting on the base classes of
    --dataset: 4 context tokens from "a photo of a", a batch of 32 holding every base class, EMPL's defaults
    (5 SGLD steps in the top 2 text blocks, 8 unseen words per task, 2 test chains: drawn once from the training
    images, the default; per test batch of 100, transductive; or per test image, with image chains).
    Two ways: over cached features, and adding the image-tower pass that the official CoOp code pays every
    step (the 32 training images) and at test (every test image); that pass is timed once on 32 images and
    added to both sides. CoOp's evaluation is the official one: its C prompts encoded per test batch.
    Random features and images: speed does not depend on the values."""
    names, _ = data.subsample_classes(ds, "base", ds.train)
    C, n_test = len(names), args.empl_test_images
    vocab = "wordnet" if os.path.isfile(data.WORDNET_NOUNS) else "imagenet"
    words = common.ClassPrompts(clip, empl.open_vocabulary(vocab, ds.classnames, 1000, seed=1), 4)
    gen, words_gen, noise_gen = (torch.Generator().manual_seed(0) for _ in range(3))
    x, y = torch.randn(32, clip.embed_dim, generator=gen).to(device), (torch.arange(32) % C).to(device)
    test = torch.randn(n_test, clip.embed_dim, generator=gen).to(device)
    train = torch.randn(16 * C, clip.embed_dim, generator=gen).to(device)   # 16 shots, for --test-condition train
    images = torch.randn(32, 3, clip.image_size, clip.image_size, generator=gen).to(device)
    start = common.words_to_embeddings(clip, "a photo of a")
    coop_model = coop.CoOp(clip, names, 4, "a photo of a")
    models = {chain: empl.EMPL(clip, start, "end", 2, 5, 1e-3, chain) for chain in ("task", "image")}

    def train_step(params, loss_fn):
        opt = torch.optim.SGD(params, lr=0.002, momentum=0.9)
        def step():
            with common.autocast(device, clip.precision):
                loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def empl_step(chain):
        m = models[chain]
        loss = lambda: empl.empl_loss(m, m.prompts(names), words, x, y, 8, 0.1, words_gen, noise_gen)
        return train_step([m.ctx], loss)

    @torch.no_grad()
    def coop_eval():  # the official evaluation: every test batch encodes the C prompts again
        for batch in test.split(100):
            with common.autocast(device, clip.precision):
                coop_model.logits(batch).float()

    stats = {}
    def empl_eval(name, chain, condition):  # condition: the training features, "image" or "batch" (empl.predict)
        def run():
            with torch.no_grad(), common.autocast(device, clip.precision):
                empl.predict(models[chain], names, test, 2, noise_gen, 100, condition, stats.setdefault(name, {}))
        return run

    with torch.no_grad(), common.autocast(device, clip.precision):
        image_pass = interleaved({"image_pass_32": lambda: clip.model.encode_image(images)}, args.repeats, device)
    steps = interleaved({"coop": train_step([coop_model.ctx], lambda: coop.coop_loss(coop_model, x, y)),
                         "empl_task": empl_step("task"), "empl_image": empl_step("image")}, args.repeats, device)
    evals = interleaved({"coop": coop_eval, **{name: empl_eval(name, chain, condition) for name, chain, condition in [
        ("empl_task_train_condition", "task", train), ("empl_task_batch_condition", "task", "batch"),
        ("empl_image_image_condition", "image", "image")]}}, args.repeats, device)
    img32, img_test = image_pass["image_pass_32"], image_pass["image_pass_32"] * n_test / 32
    batches = -(-n_test // 100)
    prompts = {"coop": C * batches, **{name: v["prompts_sampled"] for name, v in stats.items()}}
    return {
        "setting": {"base_classes": C, "batch": 32, "unseen_words": 8, "sgld_steps": 5, "sgld_layers": 2,
                    "test_chains": 2, "test_batch": 100, "test_images": n_test, "repeats": args.repeats,
                    "features_and_images": "random"},
        "image_pass_32_s": img32, "train_step_s": steps, "eval_s": evals,
        "train_step_ratio_cached": {k: v / steps["coop"] for k, v in steps.items() if k != "coop"},
        "train_step_ratio_with_image_pass": {k: (v + img32) / (steps["coop"] + img32)
                                             for k, v in steps.items() if k != "coop"},
        "eval_ratio_cached": {k: v / evals["coop"] for k, v in evals.items() if k != "coop"},
        "eval_ratio_with_image_pass": {k: (v + img_test) / (evals["coop"] + img_test)
                                       for k, v in evals.items() if k != "coop"},
        "prompts_encoded_at_test": prompts, "test_batches": batches,
        "prompts_at_test_vs_coop": {k: v / prompts["coop"] for k, v in prompts.items() if k != "coop"}}


def empl_total(args, ds, clip, device, root):
    """CoOp + EMPL as the paper runs them, through their command lines: coop.py base-to-new, then empl.py --init-from
    its prompt.pt (--shots, the methods' default epochs), each its own process on one feature cache, --repeats times
    (each time a fresh cache). Per run: wall time, training and evaluation net of feature extraction, feature
    extraction and images encoded (results.json). --empl-total-views 0 is the protocol (a fresh view per epoch, the
    real test set); K > 0 cycles K cached views and gives the test split placeholder features, which times the text
    side alone (the evaluation's accuracy is then meaningless)."""
    reps = []
    for rep in range(args.repeats):
        cache, runs = root / f"cache_{rep}", root / f"runs_{rep}"
        if args.empl_total_views:
            common.FeatureCache(cache).put(clip, ds.name, ds.test, "test", torch.randn(len(ds.test), clip.embed_dim))
        prompt = runs / "coop" / ds.name / "base2new" / f"shots_{args.shots}" / "seed_1" / "prompt.pt"
        found = {}
        for method, flags in (("coop", []), ("empl", ["--init-from", str(prompt)])):
            cmd = [sys.executable, f"{method}.py", "--dataset", ds.name, "--shots", str(args.shots), "--protocol",
                   "base2new", "--backbone", args.backbone, "--pretrained", "none", "--data-root", args.data_root,
                   "--no-download", "--aug-views", str(args.empl_total_views), "--device", str(device), "--precision",
                   clip.precision, "--workers", str(args.workers), "--cache-dir", str(cache), "--output", str(runs),
                   *flags]
            start, cpu, load = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            res = json.loads(next((runs / method).rglob("results.json")).read_text())
            t = res["times"]
            found[method] = {"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime,
                             "load_average_1min": [load, os.getloadavg()[0]], "epochs": res["config"]["epochs"],
                             "training_s": t["training_s"],
                             "evaluation_s": t["evaluation_s"], "feature_extraction_s": t["feature_extraction_s"],
                             "images_encoded": t["images_encoded"], "steps_per_epoch": res["train"]["steps_per_epoch"]}
        found["total_wall_s"] = found["coop"]["wall_s"] + found["empl"]["wall_s"]
        reps.append(found)
    worst = lambda *key: max(r[key[0]] if len(key) == 1 else r[key[0]][key[1]] for r in reps)
    return {"setting": {"dataset": ds.name, "protocol": "base2new", "shots": args.shots, "backbone": args.backbone,
                        "weights": "random", "aug_views": args.empl_total_views,
                        "test_features": "placeholders" if args.empl_total_views else "encoded",
                        "repeats": args.repeats, "torch_threads": torch.get_num_threads()},
            "repeats": reps, "worst": {"total_wall_s": worst("total_wall_s"),
                                       **{f"{m}_{k}": worst(m, k) for m in ("coop", "empl")
                                          for k in ("wall_s", "cpu_s", "training_s", "evaluation_s")}}}


COCOOP_SETTINGS = [  # (method, batch, classes, gradient checkpointing): a training step of each, in its own process
    ("coop", 32, 10, False), ("cocoop", 1, 10, False), ("cocoop", 4, 10, False),
    ("coop", 32, 1000, False), ("cocoop", 1, 1000, False), ("cocoop", 1, 1000, True), ("cocoop", 4, 1000, True),
    ("cocoop", 4, 1000, False)]


def cocoop_cost(args):
    """CoCoOp against CoOp over cached features (random features: speed and memory do not depend on the values):
    a training step (forward, backward, SGD) and the evaluation of --cocoop-test-images test images, for 10
    classes (EuroSAT's size) and ImageNet's 1,000 (the first C ImageNet names), each setting in a fresh process so that its peak resident memory
    is its own. CoOp encodes the C prompts once per step and once per evaluation; CoCoOp encodes C prompts per
    image in both. Times are the worst of --repeats; memory is the process's peak minus what it held before."""
    rows = []
    for method, batch, classes, checkpointing in COCOOP_SETTINGS:
        cmd = [sys.executable, __file__, "--cocoop-setting", method, str(batch), str(classes), str(int(checkpointing)),
               "--backbone", args.backbone, "--device", args.device, "--precision", args.precision, "--repeats",
               str(args.repeats), "--cocoop-test-images", str(args.cocoop_test_images)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        if proc.returncode != 0:  # e.g. killed for memory: say so and go on with the next setting
            rows.append({"method": method, "batch": batch, "classes": classes, "grad_checkpointing": checkpointing,
                         "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def cocoop_setting(args):
    """One setting of cocoop_cost, in this fresh process: prints one JSON line."""
    method, batch, classes, checkpointing = args.cocoop_setting
    batch, classes = int(batch), int(classes)
    device = common.resolve_device(args.device)
    clip = common.load_clip(args.backbone, "none", device, common.resolve_precision(args.precision, device))
    clip.model.set_grad_checkpointing(checkpointing == "1")
    names = list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)[:classes]  # 10: EuroSAT's size, 1,000: ImageNet
    model = (coop.CoOp(clip, names, n_ctx=None, ctx_init="a photo of a") if method == "coop"
             else cocoop.CoCoOp(clip, names, seed=1))
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, clip.embed_dim, generator=gen).to(device)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    test = torch.randn(args.cocoop_test_images, clip.embed_dim, generator=gen).to(device)
    opt = torch.optim.SGD(model.trainable(), lr=0.002, momentum=0.9)
    loss_fn = coop.coop_loss if method == "coop" else cocoop.cocoop_loss
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def step():
        with common.autocast(device, clip.precision):
            loss = loss_fn(model, feats, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def evaluate():
        with torch.no_grad(), common.autocast(device, clip.precision):
            model.logits(test)

    before, _ = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak()
    timings = {}
    for name, fn in (("train_step_s", step), ("evaluation_s", evaluate)):
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        timings[name] = max(times)
    _, peak = rss_mb()
    print(json.dumps({"method": method, "batch": batch, "classes": classes, "grad_checkpointing": checkpointing == "1",
                      "prompts_per_step": batch * classes if method == "cocoop" else classes,
                      "test_images": len(test), **timings, "evaluation_s_per_image": timings["evaluation_s"] / len(test),
                      "rss_before_mb": before, "step_peak_mb": peak, "step_extra_mb": peak - before,
                      "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}))


PROMPTED_SETTINGS = ["tower_forward_backward", "coop_with_image_pass", "vpt", "maple", "promptsrc"]


def prompted_cost(args):
    """A training step of the prompted-tower students (VPT: 8 tokens in every layer; MaPLe: 2 tokens, depth 9;
    their official settings), batch 4 (theirs), 10 classes, random images and weights (speed and memory do not
    depend on the values), each in a fresh process so that its peak resident memory is its own, against:
    tower_forward_backward, the frozen image tower's forward with VPT's prompts plus its backward to them (what
    no prompted student can go below), and coop_with_image_pass, CoOp's step plus the image tower's forward
    without gradients (what the official CoOp code pays every step). Times are the worst of --repeats;
    clip_grad_mb (always 0) is the memory held by gradients of CLIP's own weights."""
    rows = []
    for setting in PROMPTED_SETTINGS:
        cmd = [sys.executable, __file__, "--prompted-setting", setting, "--backbone", args.backbone, "--device",
               args.device, "--precision", args.precision, "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                    {"setting": setting, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def prompted_setting(args):
    """One setting of prompted_cost, in this fresh process: prints one JSON line."""
    setting, batch, classes = args.prompted_setting, 4, 10
    device = common.resolve_device(args.device)
    clip = common.load_clip(args.backbone, "none", device, common.resolve_precision(args.precision, device))
    names = list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)[:classes]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=gen).to(device)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    depth = len(clip.model.visual.transformer.resblocks)
    if setting == "coop_with_image_pass":
        model = coop.CoOp(clip, names, n_ctx=None, ctx_init="a photo of a")

        def loss_fn():
            with torch.no_grad():
                feats = clip.model.encode_image(images)  # the frozen tower, no gradient
            return coop.coop_loss(model, feats, labels)
    elif setting == "tower_forward_backward":
        model = vpt.VPT(clip, names, 8, depth)
        loss_fn = lambda: common.encode_image(clip, images, list(model.prompts)).float().sum()
    elif setting == "vpt":
        model = vpt.VPT(clip, names, 8, depth)  # VPT's config: 8 tokens in every layer
        loss_fn = lambda: vpt.vpt_loss(model, images, labels)
    elif setting == "maple":
        model = maple.MaPLe(clip, names, 2, min(9, depth))  # MaPLe's: 2 tokens, depth 9
        loss_fn = lambda: maple.maple_loss(model, images, labels)
    else:
        model = promptsrc.PromptSRC(clip, names, 4, min(9, depth))  # PromptSRC's: 4 tokens, depth 9
        frozen = torch.randn(batch, clip.embed_dim, generator=gen).to(device)  # the cache's frozen features
        loss_fn = lambda: promptsrc.promptsrc_loss(model, images, frozen, labels)
    opt = torch.optim.SGD(model.trainable(), lr=0.002, momentum=0.9)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    before, _ = rss_mb()
    reset_peak()
    times, cpu_times = [], []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with common.autocast(device, clip.precision):
            loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # CPU seconds of all threads: less hurt by other jobs
    _, peak = rss_mb()
    clip_grads = sum(p.grad.numel() * p.grad.element_size() for p in clip.model.parameters() if p.grad is not None)
    print(json.dumps({"setting": setting, "backbone": args.backbone, "batch": batch, "classes": classes,
                      "step_s": max(times[1:]), "step_s_per_image": max(times[1:]) / batch,
                      "step_cpu_s": max(cpu_times[1:]), "step_cpu_s_per_image": max(cpu_times[1:]) / batch,
                      "rss_before_mb": before, "step_peak_mb": peak, "step_extra_mb": peak - before,
                      "clip_grad_mb": clip_grads / 2**20, "trainable": sum(p.numel() for p in model.trainable())}))


GPU_CHECK_METHODS = {  # method -> its command's own flags (a random ViT-B/32 teacher, the offline LLM embedder)
    "zsclip": ("coop.py", ["--zero-shot"]), "coop": ("coop.py", []), "cocoop": ("cocoop.py", []),
    "vpt": ("vpt.py", []), "maple": ("maple.py", []),
    "kdpl": ("kdpl.py", ["--teacher", "ViT-B-32", "--teacher-pretrained", "none"]),
    "kdpl_cocoop": ("kdpl.py", ["--student", "cocoop", "--teacher", "ViT-B-32", "--teacher-pretrained", "none"]),
    "kdpl_vpt": ("kdpl.py", ["--student", "vpt", "--teacher", "ViT-B-32", "--teacher-pretrained", "none"]),
    "kdpl_maple": ("kdpl.py", ["--student", "maple", "--teacher", "ViT-B-32", "--teacher-pretrained", "none"]),
    "promptsrc": ("promptsrc.py", []),
    "kdpl_promptsrc": ("kdpl.py", ["--student", "promptsrc", "--teacher", "ViT-B-32", "--teacher-pretrained", "none"]),
    "mopd": ("mopd.py", []), "demul": ("demul.py", ["--llm", "minilm", "--pretrain-names", "2000"]),
    "empl": ("empl.py", ["--vocab", "imagenet"])}


def gpu_check(args):
    """The prepared GPU check: every method's command line once for real on --device, under bf16 and fp16
    autocast, --backbone with random weights (default ViT-B/16), --gpu-check-epochs epochs on 4-shot EuroSAT
    base-to-new with --images test images; its seconds per step, evaluation seconds and whether it trained
    (finite losses) in one table. Accuracy is meaningless (random weights). On the CPU: --device cpu
    --backbone tiny (the tests run it so)."""
    root = Path(args.output) / "tmp" / str(time.time_ns())
    data_root = subset_root(args, root / "data")
    rows = []
    for precision in args.gpu_check_precisions:
        for method in args.gpu_check_methods:
            script, flags = GPU_CHECK_METHODS[method]
            if args.backbone in common.TINY_CONFIGS:  # tiny towers have 2 layers; the teacher a tiny one too
                flags = [f.replace("ViT-B-32", "tiny-wide") for f in flags] + (
                    ["--depth", "2"] if method in ("vpt", "maple", "kdpl_vpt", "kdpl_maple") else [])
            out = root / "runs" / precision
            cmd = [sys.executable, script, "--dataset", args.dataset, "--shots", "4", "--protocol", "base2new",
                   "--epochs", str(args.gpu_check_epochs), "--backbone", args.backbone, "--pretrained", "none",
                   "--data-root", data_root, "--no-download", "--cache-dir", str(root / "cache"), "--output", str(out),
                   "--device", args.device, "--precision", precision, "--workers", str(args.workers), *flags]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
            row = {"method": method, "precision": precision, "wall_s": round(time.perf_counter() - start, 1)}
            name = "zsclip" if method == "zsclip" else method
            found = sorted((out / name).rglob("results.json")) if (out / name).exists() else []
            if proc.returncode != 0 or not found:
                row["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
            else:
                res = json.loads(found[0].read_text())
                train = res.get("train", {})
                steps = train.get("steps_per_epoch")
                row.update(step_s=round(res["times"]["training_s"] / (steps * train["epochs"]), 4) if steps else None,
                           evaluation_s=round(res["times"]["evaluation_s"], 2),
                           trained=all(math.isfinite(x) for x in train.get("loss_per_epoch", [0.0])),
                           skipped_steps=train.get("skipped_steps"))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    header = f"{'method':<12} {'precision':<9} {'s/step':>8} {'eval s':>8} {'wall s':>8}  result"
    lines = [header] + [f"{r['method']:<12} {r['precision']:<9} {str(r.get('step_s') or '-'):>8} "
                        f"{str(r.get('evaluation_s', '-')):>8} {r['wall_s']:>8}  "
                        f"{r.get('error') or ('ok' if r.get('trained') else 'loss not finite')}" for r in rows]
    print("\n".join(lines))
    return {"device": args.device, "backbone": args.backbone, "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() and args.device != "cpu" else None, "rows": rows, "table": lines}


def write_json(path, result):
    common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))


def main():
    try:
        measure()
    except (common.UserError, data.DataError) as err:  # a full disk, a missing dataset: one message
        sys.exit(f"error: {err}")


def measure():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--dataset", default="eurosat")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="test images to encode for the images/s figure")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="runs/benchmark")
    p.add_argument("--methods", nargs="*", default=[], help="also time these methods' training (coop mopd ...)")
    p.add_argument("--empl-cost", action="store_true", help="only EMPL's step and evaluation cost relative to CoOp's")
    p.add_argument("--empl-test-images", type=int, default=200, help="test images of --empl-cost's evaluation")
    p.add_argument("--empl-total", action="store_true", help="only CoOp + EMPL's command lines, one after the other")
    p.add_argument("--empl-total-views", type=int, default=0,
                   help="--empl-total: 0 = the protocol's fresh views; K > 0 = K cached views, placeholder test features")
    p.add_argument("--cocoop-cost", action="store_true", help="only CoCoOp's step, evaluation and memory against CoOp's")
    p.add_argument("--cocoop-test-images", type=int, default=8, help="test images of --cocoop-cost's evaluation")
    p.add_argument("--cocoop-setting", nargs=4, help=argparse.SUPPRESS)  # cocoop_cost's fresh interpreter
    p.add_argument("--prompted-cost", action="store_true", help="only the prompted students' training step")
    p.add_argument("--prompted-setting", choices=PROMPTED_SETTINGS, help=argparse.SUPPRESS)  # prompted_cost's
    p.add_argument("--gpu-check", action="store_true", help="every method once for real on --device (default cuda)")
    p.add_argument("--gpu-check-methods", nargs="+", default=list(GPU_CHECK_METHODS), choices=list(GPU_CHECK_METHODS))
    p.add_argument("--gpu-check-precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--gpu-check-epochs", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="only memory: cold and warm coop.py runs and their phases "
                                                         "(--images N keeps N test images; 0 = all)")
    p.add_argument("--memory-runs", type=int, default=5, help="--memory: cold runs, warm runs and phase runs, each; "
                                                              "the maximum peak of each kind is reported")
    p.add_argument("--memory-phases", action="store_true", help=argparse.SUPPRESS)  # memory()'s fresh interpreter
    p.add_argument("--phases-dir", default="phases", help=argparse.SUPPRESS)  # its cache's folder under --output
    p.add_argument("--grid", action="store_true", help="only the image-tower passes of a small paper grid")
    p.add_argument("--grid-epochs", type=int, default=2, help="epochs of every run of --grid")
    args = p.parse_args()
    if args.memory_runs < 1:
        p.error("--memory-runs must be at least 1")
    if args.memory_phases:
        return memory_phases(args)
    if args.cocoop_setting:
        return cocoop_setting(args)
    if args.prompted_setting:
        return prompted_setting(args)
    if args.prompted_cost or args.gpu_check:
        if args.gpu_check and args.device == "auto":
            args.device = "cuda"
        if args.gpu_check and args.images == 256:  # the default of the images/s figure: the check keeps 500
            args.images = 500
        result = prompted_cost(args) if args.prompted_cost else gpu_check(args)
        name = "prompted_cost" if args.prompted_cost else "gpu_check"
        write_json(Path(args.output) / f"{name}_{args.backbone}_{args.device}.json", result)
        if args.prompted_cost:
            print(json.dumps(result, indent=1))
        return
    if args.cocoop_cost:
        result = {"backbone": args.backbone, "device": args.device, "precision": args.precision,
                  "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                  "repeats": args.repeats, "settings": cocoop_cost(args)}
        write_json(Path(args.output) / f"cocoop_cost_{args.backbone}_{args.device}.json", result)
        print(json.dumps(result, indent=1))
        return
    if args.memory or args.grid:
        root = Path(args.output) / "tmp" / str(time.time_ns())
        result = memory(args, root) if args.memory else grid(args, root)
        name = f"{'memory' if args.memory else 'grid'}_{args.backbone}_{args.dataset}.json"
        write_json(Path(args.output) / name, result)
        print(json.dumps(result, indent=1))
        return
    device = common.resolve_device(args.device)
    ds = data.load_dataset(args.dataset, args.data_root, download=False)
    clip = common.load_clip(args.backbone, "none", device, common.resolve_precision(args.precision, device))
    result = {"backbone": args.backbone, "dataset": ds.name, "device": str(device), "precision": clip.precision,
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "versions": common.versions()}
    if args.empl_total:
        result["empl_total"] = empl_total(args, ds, clip, device, Path(args.output) / "tmp" / str(time.time_ns()))
        out = Path(args.output) / f"empl_total_{args.backbone}_{ds.name}_views{args.empl_total_views}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["empl_total"], indent=1))
        return
    if args.empl_cost:
        result["empl_cost"] = empl_cost(args, ds, clip, device)
        write_json(Path(args.output) / f"empl_cost_{args.backbone}_{ds.name}_{device.type}.json", result)
        print(json.dumps(result["empl_cost"], indent=1))
        return

    # image tower: a fresh cache so every image is really encoded
    cache = common.FeatureCache(Path(args.output) / "tmp" / str(time.time_ns()), workers=args.workers)
    items = ds.test[:args.images]
    start = time.perf_counter()
    cache.get(clip, ds.name, items, "test")
    result["image_features_per_s"] = len(items) / (time.perf_counter() - start)

    # CoOp's step over cached features: 16 context tokens, all classes, batch 32
    train, _ = data.fewshot_split(ds, args.shots, 1)
    model = coop.CoOp(clip, ds.classnames, n_ctx=16)
    feats = torch.randn(len(train), clip.embed_dim, device=device)
    labels = torch.tensor([it.label for it in train], device=device)
    steps = common.steps_per_epoch(len(train), 32)
    opt = torch.optim.SGD([model.ctx], lr=0.002, momentum=0.9)

    def step():
        with common.autocast(device, clip.precision):
            loss = coop.coop_loss(model, feats[:32], labels[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["train_step_s"] = common.seconds(step, device, args.repeats)
    result["train_epoch_s"] = result["train_step_s"] * steps
    result["steps_per_epoch"] = steps

    # text tower with and without the EOT cut (forward + backward through the context)
    prompts = model.prompts

    def text_pass(pad):
        def run():
            with common.autocast(device, clip.precision):
                x = prompts.embed(model.ctx)
                common.encode_text(clip, padded_to_77(x) if pad else x, prompts.eot).float().sum().backward()
        return run

    cut_s = common.seconds(text_pass(False), device, args.repeats)
    full_s = common.seconds(text_pass(True), device, args.repeats)
    result.update(text_len_cut=prompts.tokens.shape[1], text_cut_s=cut_s, text_full77_s=full_s,
                  text_speedup=full_s / cut_s)
    if args.methods:
        result["methods"] = method_timings(args, ds, clip, device, Path(args.output) / "tmp" / str(time.time_ns()))
    result["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    write_json(Path(args.output) / f"{args.backbone}_{ds.name}_{device.type}.json", result)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "versions"},
                     indent=1))


if __name__ == "__main__":
    main()
