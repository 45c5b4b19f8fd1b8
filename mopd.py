"""MoPD -- Mixture-of-Prompts Distillation for Vision-Language Models.
Chen, Fu, Zhang. arXiv 2412.19087 (IEEE TMM 2025). Official code: github.com/cheny02/MoPD-TMM, pinned below.

A CoOp soft prompt (the student) learns from a pool of H hand-crafted hard prompts (the teachers). A
gating network picks, per image, the T teachers to distil from:
    l^S   = s * z . norm(g(student prompts))^T,     l^h = s * z . t_h^T   (t_h: frozen, normalised, h = 1..H)
    g(x)  = z W_g  (W_g: D x H, no bias, zero init),   (v, I) = topk(g(x), T),   pi = softmax(v)
    L_MPD = 1/B sum_b sum_k pi_bk tau^2 KL(softmax(l^{I_bk} / tau) || softmax(l^S / tau))
    L_MPS = 1/B sum_b sum_k pi_bk CE(l^{I_bk}, y_b)           (teacher logits are constants: trains W_g only)
    L     = w CE(l^S, y) + (1 - w) L_MPD + w2 L_MPS
z is the normalised image feature, s CLIP's logit scale. Inference uses the student prompt only.
The paper's equation numbers could not be checked, so each loss line names the paper's loss (CE, MPD, MPS)
and the line of the official code it follows ("MoPD.py l.N"):
https://github.com/cheny02/MoPD-TMM/blob/7cb6843ba44ab99df56f6f70ecc637b034d05a04/trainers/MoPD.py#L186-L216
    the student and teacher logits, the gate (zero init: L129-L131), top-T, L_MPD
https://github.com/cheny02/MoPD-TMM/blob/7cb6843ba44ab99df56f6f70ecc637b034d05a04/trainers/MoPD.py#L299-L309
    L_MPS and L = w CE + (1 - w) L_MPD + w2 L_MPS
https://github.com/cheny02/MoPD-TMM/blob/7cb6843ba44ab99df56f6f70ecc637b034d05a04/trainers/mopd_templates.py
    the pools
https://github.com/cheny02/MoPD-TMM/blob/7cb6843ba44ab99df56f6f70ecc637b034d05a04/scripts/run.sh
    the per-dataset settings

Faithful to the official code: student = 4 context tokens from "a photo of a", class token at the end,
shared; the 12-template pool of each dataset (mopd_templates.py CUSTOM_TEMPLATES) and the LASP / NOISY
pools; the gate and both losses with the code's semantics (KL(teacher || student) summed over classes,
x tau^2; MPS ignores tau; nothing detached, so MPD trains the gate too); ctx and W_g in one SGD (weight
decay included); per-dataset (w, w2, T, epochs) from scripts/run.sh; batch 128, lr 0.002, tau = 1.
Differences: the gate width is CLIP's embedding width (the code hard-codes 512: RN50/ViT-L break); the
teacher features come from the same frozen CLIP (the code loads a second copy of the same weights);
AMP with fp32 weights instead of fp16 CLIP. Reconstructed (one line each where used): the 25-epoch
config missing from the repo, --pool noisy as the dataset pool + the noisy templates, --pool-size as
the first N templates, the few-shot protocol reusing the base-to-new table; the gate report reads the
last epoch's training view.

    python mopd.py --dataset eurosat                       # base-to-new, 16 shots, EuroSAT's official settings
    python mopd.py --dataset eurosat --pool noisy          # 12 good + 12 nonsense teachers
    python mopd.py --dataset dtd --protocol fewshot --shots 4
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

# (w, w2, top-T, epochs) per dataset: scripts/run.sh of the official code. Its 25-epoch config
# (vit_b16_ep25_ctxv1) is missing from the repo: reconstructed as the ep100 config with 25 epochs.
OFFICIAL_SETTINGS = {
    "imagenet": (0.8, 0.0005, 3, 25), "caltech101": (0.8, 0.0005, 3, 100), "oxford_pets": (0.8, 0.5, 3, 25),
    "stanford_cars": (0.8, 0.1, 3, 100), "oxford_flowers": (0.8, 0.1, 3, 100), "food101": (0.5, 0.1, 2, 25),
    "fgvc_aircraft": (0.8, 0.1, 2, 25), "sun397": (0.8, 0.1, 2, 25), "dtd": (0.8, 0.1, 2, 25),
    "eurosat": (0.5, 0.1, 2, 100), "ucf101": (0.5, 0.1, 2, 25)}

# The dataset pools (mopd_templates.py CUSTOM_TEMPLATES): 3 nouns x 4 forms. <n> = "a photo" / "a picture" /
# "an image", <w> = the bare noun, <v> = classified / categorized / labeled. (3 "of" forms, 9 "as" forms.)
POOL_PATTERNS = {
    "oxford_pets": ("<n> of a {}, a type of pet.", "<n> of a pet, <v> as {}."),
    "oxford_flowers": ("<n> of a {}, a type of flower.", "<n> of a flower, <v> as {}."),
    "fgvc_aircraft": ("<n> of a {}, a type of aircraft.", "<n> of a aircraft, <v> as {}."),  # "a aircraft" as official
    "dtd": ("<n> of {}, a type of texture.", "<n> of a texture, <v> as {}."),
    "food101": ("<n> of {}, a type of food.", "<n> of food, <v> as {}."),
    "eurosat": ("a centered satellite <w> of {}.", "a centered satellite <w>, <v> as {}."),
    "ucf101": ("<n> of a person doing {}.", "<n> of a person doing, <v> as {}."),
}
GENERIC_PATTERN = ("<n> of a {}.", "<n>, <v> as {}.")  # stanford_cars, sun397, caltech101, imagenet
NOUNS = [("a photo", "photo"), ("a picture", "picture"), ("an image", "image")]
VERBS = ["classified", "categorized", "labeled"]

# LASP_PROMPTS of mopd_templates.py, "the mixture of task-related and task-unrelated hard prompt pool" (35;
# "a bad photo of the {}." appears twice there and here).
LASP_POOL = [
    "a photo of a {}, a type of flower.", "a photo of a person doing {}.", "a centered satellite photo of {}.",
    "a photo of a {}, a type of aircraft.", "{} texture.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
    "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    "a photo of a {}.", "a photo of many {}.", "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a pixelated photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a close-up photo of the {}.", "a low resolution photo of a {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}."]
# NOISY_PROMPTS of mopd_templates.py ("Group A"): task-unrelated teachers for the noisy-prompt analysis.
NOISY_TEMPLATES = [
    "a collection of {} floating in the sky", "{} wrapped in a mysterious bubble", "an unexpected encounter with a {}",
    "a {} hidden among the stars", "a vibrant dance of the {}", "the laughter of a {} echoing through the forest",
    "a {} emerging from the depths of the ocean", "a journey through the pages of a {}",
    "the whispers of a {} in the wind", "a {} perched on the edge of a cliff", "a {} illuminated by the moonlight",
    "the song of a {} resonating in the mountains"]


def dataset_pool(name):
    """The official 12 templates of a dataset (ImageNet's for the test-only ImageNet variants)."""
    def fill(pattern, n, w, v=""):
        return pattern.replace("<n>", n).replace("<w>", w).replace("<v>", v)
    of, as_ = POOL_PATTERNS.get(name, GENERIC_PATTERN)
    return [fill(of, n, w) for n, w in NOUNS] + [fill(as_, n, w, v) for n, w in NOUNS for v in VERBS]


def read_pool(path):
    """A pool file: one template per line, each with exactly one "{}" for the class name."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise common.UserError(f"--pool {path!r} is not dataset, lasp or noisy, and cannot be read as a template "
                               f"file ({getattr(err, 'strerror', None) or err})") from None
    for i, t in enumerate(lines, 1):
        if t.count("{}") != 1 or t.replace("{}", "").count("{") + t.replace("{}", "").count("}"):
            raise common.UserError(f"{path} line {i}: a template needs exactly one '{{}}' for the class name and no "
                                   f"other braces: {t!r}")
    if not lines:
        raise common.UserError(f"the pool file {path} holds no templates (one per line, with '{{}}')")
    return lines


def make_pool(pool, dataset):
    if pool == "dataset":
        return dataset_pool(dataset)
    if pool == "lasp":
        return list(LASP_POOL)
    if pool == "noisy":  # reconstructed: how the paper mixed good and noisy teachers is not in the code
        return dataset_pool(dataset) + NOISY_TEMPLATES
    return read_pool(pool)


def parse_args(argv=None):
    p = common.base_parser("MoPD: mixture-of-prompts distillation from hard prompts (arXiv 2412.19087).")
    p.set_defaults(protocol="base2new",  # the official scripts cover base-to-new only (base2new_train.sh)
                   batch_size=128)       # configs/trainers/MoPD/*.yaml: TRAIN_X.BATCH_SIZE 128
    p.add_argument("--w", type=float, help="weight of CE; 1 - w weighs L_MPD (default: per dataset, run.sh)")
    p.add_argument("--w2", type=float, help="weight of L_MPS (default: per dataset, run.sh)")
    p.add_argument("--top-t", type=int, help="teachers selected per image, T (default: per dataset, run.sh)")
    p.add_argument("--tau", type=float, default=1.0, help="distillation temperature")  # train.py: LOSS.T = 1.0
    p.add_argument("--pool", default="dataset", help="teacher pool: dataset (its 12 official templates), lasp (35 "
                   "generic ones), noisy (dataset + 12 nonsense ones), or a FILE with one '{}' template per line")
    p.add_argument("--pool-size", type=int, help="keep the first N templates of the pool (pool-size analysis)")
    p.add_argument("--ctx-init", default="a photo of a", help="student context init (the code hard-codes it)")
    args = p.parse_args(argv)
    try:
        name = data.canonical_name(args.dataset)
        args.templates = make_pool(args.pool, name)
    except (data.DataError, common.UserError) as err:
        p.error(str(err))
    official = OFFICIAL_SETTINGS.get(name)  # few-shot reuses the base-to-new table (reconstructed: no official script)
    for i, key in enumerate(["w", "w2", "top_t", "epochs"]):
        if getattr(args, key) is None:
            if official is None:
                p.error(f"no official MoPD setting for {name}: pass --w, --w2, --top-t and --epochs")
            setattr(args, key, official[i])
    common.resolve_epochs(p, args)  # the table always gives epochs: this checks a given --epochs
    if args.pool_size is not None:  # reconstructed: the first N templates of the pool
        if not 1 <= args.pool_size <= len(args.templates):
            p.error(f"--pool-size {args.pool_size}: the {args.pool} pool has {len(args.templates)} templates")
        args.templates = args.templates[:args.pool_size]
    if not 1 <= args.top_t <= len(args.templates):
        p.error(f"--top-t {args.top_t} must be between 1 and the pool size ({len(args.templates)})")
    if not (0 <= args.w <= 1 and args.w2 >= 0 and args.tau > 0):
        p.error("need 0 <= --w <= 1, --w2 >= 0 and --tau > 0")
    if not args.ctx_init.strip():
        p.error("--ctx-init must hold at least one word")
    return args


# --------------------------------------------------------------------------------------------------
# The method: the teachers, the student, the gate, the losses
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def pool_features(clip, templates, classnames):
    """Teacher text features t_h (H, C, D) from the frozen CLIP, computed once (normalised in the classifier)."""
    names = [c.replace("_", " ") for c in classnames]
    feats = common.encode_texts(clip, [t.format(c) for t in templates for c in names])
    return feats.view(len(templates), len(names), -1)


class MoPD(nn.Module):
    """The student context, the teachers' features and the gating network W_g."""

    def __init__(self, clip, classnames, teacher, top_t, ctx_init="a photo of a"):
        super().__init__()
        self.clip, self.classnames, self.top_t = clip, list(classnames), top_t
        self.ctx = nn.Parameter(common.words_to_embeddings(clip, ctx_init))  # PromptLearner: "a photo of a"
        self.n_ctx = self.ctx.shape[0]
        self.prompts = common.ClassPrompts(clip, classnames, self.n_ctx)  # the student's training prompts
        self.register_buffer("teacher", teacher)  # (H, C, D)
        # W_g: bias-free, zero init (MoPD.py l.130); D = CLIP's embedding width, not a hard-coded 512
        self.gate = nn.Parameter(torch.zeros(clip.embed_dim, teacher.shape[0], device=clip.device))

    def logits(self, image_feats, classnames=None):
        """Student logits l^S (inference uses these only), over the training classes or `classnames`."""
        same = classnames is None or list(classnames) == self.classnames
        prompts = self.prompts if same else common.ClassPrompts(self.clip, classnames, self.n_ctx)
        return common.cosine_logits(image_feats, prompts.features(self.ctx), self.clip.logit_scale)

    def teacher_logits(self, image_feats):
        """l^h = s * z . t_h^T for every hard prompt h: (B, H, C), in fp32 (CLIP's classifier on the H x C texts)."""
        H, C = self.teacher.shape[:2]
        return common.cosine_logits(image_feats, self.teacher.flatten(0, 1), self.clip.logit_scale).view(-1, H, C)

    def gate_logits(self, image_feats):
        """g(x) = z W_g on the normalised image feature (MoPD.py l.200): (B, H), in fp32."""
        with torch.autocast(image_feats.device.type, enabled=False):
            return F.normalize(image_feats.float(), dim=-1) @ self.gate


def select(gate_logits, top_t):
    """Top-T teachers per image and their weights pi = softmax over the selected gate logits (l.201-202)."""
    v, idx = gate_logits.topk(top_t, dim=1)
    return v.softmax(dim=1), idx


def mopd_loss(student_logits, teacher_logits, gate_logits, labels, top_t, w, w2, tau):
    """L = w CE + (1 - w) L_MPD + w2 L_MPS. student_logits (B, C), teacher_logits (B, H, C), gate_logits
    (B, H). Returns the total and its parts."""
    student, teacher = student_logits.float(), teacher_logits.float()
    pi, idx = select(gate_logits.float(), top_t)                                  # (B, T) each
    chosen = teacher[torch.arange(len(idx), device=idx.device)[:, None], idx]     # l^{I_bk}: (B, T, C)
    ce = F.cross_entropy(student, labels)                                         # CE (MoPD.py l.307)
    # MPD (MoPD.py l.203-214): KL(softmax(l^T/tau) || softmax(l^S/tau)) summed over classes, x tau^2, pi-weighted.
    # F.kl_div on log-probabilities: a hand-written p log p gives NaN where p underflows at logit scale 100.
    log_s = F.log_softmax(student / tau, dim=-1).unsqueeze(1).expand_as(chosen)
    kl = F.kl_div(log_s, F.log_softmax(chosen / tau, dim=-1), reduction="none", log_target=True).sum(-1)
    mpd = (pi * tau ** 2 * kl).sum(1).mean()
    # MPS (MoPD.py l.301-305): pi-weighted CE of the selected teachers' raw logits (no tau)
    ce_teacher = F.cross_entropy(chosen.flatten(0, 1), labels.repeat_interleave(top_t), reduction="none")
    mps = (pi * ce_teacher.view_as(pi)).sum(1).mean()
    total = w * ce + (1 - w) * mpd + w2 * mps                                     # MoPD.py l.309
    return total, {"ce": ce, "mpd": mpd, "mps": mps, "pi": pi, "idx": idx}


def model_loss(model, image_feats, labels, w, w2, tau):
    return mopd_loss(model.logits(image_feats), model.teacher_logits(image_feats), model.gate_logits(image_feats),
                     labels, model.top_t, w, w2, tau)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, the gate's report, the run, results
# --------------------------------------------------------------------------------------------------
def saved_model(exp, saved):
    """The MoPD of a --load-prompt file: its student context. Inference uses the student only, so the
    teachers are not encoded (zeros of their shape hold their place)."""
    unused_teacher = torch.zeros(len(saved["templates"]), len(exp.classnames), exp.clip.embed_dim,
                                 device=exp.clip.device)
    model = MoPD(exp.clip, exp.classnames, unused_teacher, saved["top_t"], saved["ctx_init"])
    model.ctx.data.copy_(saved["ctx"])
    return model


@torch.no_grad()
def gate_usage(model, image_feats):
    """Mean over images of the full gate weights (pi scattered to the H templates; 0 where unselected)."""
    pi, idx = select(model.gate_logits(image_feats), model.top_t)
    full = torch.zeros(len(pi), model.teacher.shape[0], device=pi.device).scatter(1, idx, pi)
    return full.mean(0)


def gate_report(model, image_feats, labels, templates, hyper):
    """Which teachers the gate trusts and the final loss terms, on the last epoch's (cached) training view."""
    usage = gate_usage(model, image_feats).tolist()
    with torch.no_grad():
        _, parts = model_loss(model, image_feats, labels, **hyper)
    trusted = sorted(zip(usage, templates), reverse=True)[:3]
    print("templates the gate trusts most:", "; ".join(f"{u:.2f} {t!r}" for u, t in trusted))
    return {"gate_weight_per_template": [{"template": t, "weight": u} for t, u in zip(templates, usage)],
            "final_losses": {k: float(parts[k]) for k in ("ce", "mpd", "mps")}}


def run(args, seed):
    out = common.claim_run_dir(args, "mopd", seed)
    exp = common.prepare(args, seed)
    hyper = dict(w=args.w, w2=args.w2, tau=args.tau)
    saved = exp.load_prompt("mopd")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        teacher = pool_features(exp.clip, args.templates, exp.classnames)
        model = MoPD(exp.clip, exp.classnames, teacher, args.top_t, args.ctx_init)
        stats = exp.fit([model.ctx, model.gate], lambda feats, labels: model_loss(model, feats, labels, **hyper)[0],
                        desc="MoPD")
        extra = {"train": stats, "steps_per_epoch": stats["steps_per_epoch"]}
        if stats["steps_per_epoch"] == 1:
            print(f"note: {len(exp.train)} training images at batch {args.batch_size} give 1 step per epoch (the "
                  f"official setting; see KgCoOp issue #2); --batch-size 32 gives more steps", file=sys.stderr)
    metrics = exp.evaluate(lambda names, feats: model.logits(feats, names))  # student prompt only
    extra["nearest_words"] = common.nearest_words(exp.clip, model.ctx.detach())
    if not saved:
        common.save_prompt(out, exp, "mopd", model.ctx, gate=model.gate, templates=args.templates,
                           ctx_init=args.ctx_init, top_t=args.top_t)
        extra.update(gate_report(model, exp.train_features(args.epochs - 1), exp.labels, args.templates, hyper))
    common.write_results(out, exp, "mopd", metrics, extra)
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "mopd", run)


if __name__ == "__main__":
    main()
