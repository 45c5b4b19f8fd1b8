"""EMPL -- Energy-based Multi-prompt Learning.
Chen, Huang, Guan, Lin, Luo. "A Retrospect to Multi-prompt Learning across Vision and Language", ICCV 2023,
arXiv 2511.00191. NO public code, and the paper's equations could not be read (research notes methods.md §6,
papers.md §2): this file is a RECONSTRUCTION from the described mechanisms. What the description fixes:
  * frozen CLIP and CoOp's learnable context phi, nothing else trained; start from CoOp ("a photo of a") or a
    saved coop.py prompt (--init-from);
  * an energy E_phi(x, H) over image-prompt pairs from CLIP's contrastive score, p(H | x) ~ exp(-E_phi(x, H))
    (Eq. 6-7), sampled by SGLD (Eq. 9):  H <- H - (alpha/2) dE/dH + sqrt(alpha) eps,  eps ~ N(0, I),
    started from the learned context, conditioned on the image, acting in the top 2 text blocks (Table 4);
  * a meta-learning objective (Eq. 8): each batch is a task with the observed classes V_i and a few unseen
    words U_i from an open vocabulary; loss = CE over V_i with the sampled prompts + lambda * (unseen-word
    term), lambda = 0.1 (Fig. 6); several sampled prompts at test time (Fig. 7).
Reconstructed (each also marked "# reconstruction:" where it is made):
  R1 energy: E(x, H) = -logsumexp_c s*cos(f(x), g(H_c)) over the task's classes (JEM's free energy; label-free,
     so training and test sample the same way); pair energy E(x, H_c) = -s*cos(f(x), g(H_c)).
  R2 SGLD acts on the hidden states of the context tokens entering the top --sgld-layers blocks; the class
     name, SOS and EOT positions stay deterministic.
  R3 alpha = step_size * mean(H0^2) over those states: the standard Eq. 9 in units of the hidden-state scale.
  R4 defaults: 5 SGLD steps (methods.md §6.2), step size 1e-3, 2 samples at test ("2x inference prompts").
  R5 training: one chain per image; CE sees H0(phi) + stopgrad(H_K - H0), so gradients reach phi through the
     starting states and the top blocks, not through the chain.
  R6 unseen-word term = -log p(V_i | x) under the softmax over V_i u U_i = softplus(E_V(x) - E_U(x)): keeps
     observed images away from (high energy with, low confidence for) every unseen word (Prop. 3's reading).
  R7 vocabulary: WordNet nouns (or ImageNet names, or --vocab FILE) minus ALL the dataset's class names (new
     classes too), tokenised once (optionally a seeded subset, --vocab-pool); --unseen-per-batch words per step.
  R8 test: p(y|x) = mean over --samples chains of softmax(s*cos(f(x), g(H^s_c(x)))).
  R9 epochs and optimiser: coop.py's recipe (paper: ~3x CoOp's training time, i.e. same schedule, dearer steps).

    python empl.py --dataset eurosat --shots 16                       # base-to-new (the default protocol)
    python empl.py --dataset eurosat --shots 16 --init-from runs/coop/eurosat/base2new/shots_16/seed_1/prompt.pt
"""
import os
import time

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

EPOCHS_BASE2NEW = 200  # reconstruction: coop.py's recipe (R9); few-shot: common.FEWSHOT_EPOCHS


def parse_args(argv=None):
    p = common.base_parser("EMPL: energy-based multi-prompt learning with SGLD-sampled prompts (ICCV 2023).")
    p.set_defaults(protocol="base2new")  # the paper's main protocol
    p.add_argument("--ctx-init", help='context words (default "a photo of a", CoOp\'s base-to-new init)')
    p.add_argument("--init-from", help="start from a coop.py prompt.pt (shared context, same backbone)")
    p.add_argument("--sgld-layers", type=int, default=2, help="top text blocks SGLD acts in (paper Table 4: 2)")
    # reconstruction: the paper's SGLD schedule, sample count and |U_i| are unknown (R3, R4)
    p.add_argument("--sgld-steps", type=int, default=5, help="SGLD steps per chain (methods.md §6.2)")
    p.add_argument("--sgld-step-size", type=float, default=1e-3,
                   help="alpha in units of the mean square of the hidden states it moves")
    p.add_argument("--samples", type=int, default=2, help="sampled prompt sets per test image (paper: 2x prompts)")
    p.add_argument("--unseen-per-batch", type=int, default=8, help="unseen words per task (paper sweeps 1, 2, 4, 8)")
    p.add_argument("--lam", type=float, default=0.1, help="weight of the unseen-word term (paper Fig. 6: 0.1)")
    p.add_argument("--vocab", default="wordnet", help="open vocabulary: wordnet, imagenet, or a names file")
    p.add_argument("--vocab-pool", type=int, default=0, help="keep a seeded subset of this many words (0 = all)")
    args = p.parse_args(argv)
    if args.ctx_init and args.init_from:
        p.error("--ctx-init and --init-from both set the starting context; choose one")
    args.ctx_init = None if args.init_from else (args.ctx_init or "a photo of a")
    for flag in ("sgld_layers", "samples", "unseen_per_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.sgld_steps, args.sgld_step_size, args.lam, args.vocab_pool) < 0:
        p.error("--sgld-steps, --sgld-step-size, --lam and --vocab-pool must not be negative")
    if args.epochs is None:
        official = common.fewshot_epochs(args.dataset, args.shots)
        base2new = args.protocol == "base2new" and official != common.IMAGENET_EPOCHS
        args.epochs = EPOCHS_BASE2NEW if base2new else official
        if args.epochs is None:
            p.error(f"no epoch count for {args.shots} shots; pass --epochs")
    return args


# --------------------------------------------------------------------------------------------------
# Energy (Eq. 6-7, reconstructed R1) and SGLD (Eq. 9)
# --------------------------------------------------------------------------------------------------
def pair_logits(image_feats, text_feats, logit_scale):
    """s*cos(f(x_n), g(H_nc)) for per-image class features text_feats (N, C, D) -> (N, C)."""
    return logit_scale * torch.einsum("nd,ncd->nc", F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1))


def energy(image_feats, text_feats, logit_scale):
    """E(x, H) = -logsumexp_c s*cos(f(x), g(H_c)) (R1); the pair energy E(x, H_c) is -pair_logits."""
    return -torch.logsumexp(pair_logits(image_feats, text_feats, logit_scale), dim=-1)  # reconstruction: R1


def sgld(H0, energy_fn, steps, alpha, mask, gen, noise_scale=1.0):
    """Eq. (9): H <- H - (alpha/2) dE/dH + sqrt(alpha) eps on the positions in mask (one chain per row of
    energy_fn's output; chains do not interact, so the gradient of the sum is each chain's own)."""
    H = H0.detach().float()
    for _ in range(steps):
        with torch.enable_grad():
            H.requires_grad_(True)
            grad, = torch.autograd.grad(energy_fn(H).sum(), H)
        eps = torch.randn(H.shape, generator=gen, device=H.device)
        H = (H + mask * (-alpha / 2 * grad + alpha ** 0.5 * noise_scale * eps)).detach()
    return H


# --------------------------------------------------------------------------------------------------
# The prompt module: CoOp's context, entering the text tower's top blocks
# --------------------------------------------------------------------------------------------------
class EMPL(nn.Module):
    def __init__(self, clip, ctx, position="end", sgld_layers=2, steps=5, step_size=1e-3):
        super().__init__()
        n_layers = len(clip.text.transformer.resblocks)
        if not 1 <= sgld_layers <= n_layers:
            raise common.UserError(f"--sgld-layers {sgld_layers}: this text tower has {n_layers} blocks")
        self.clip, self.position, self.steps, self.step_size = clip, position, steps, step_size
        self.layer = n_layers - sgld_layers  # SGLD acts on the states entering block `layer`
        self.ctx = nn.Parameter(ctx.to(clip.device).float().clone())

    def prompts(self, classnames):
        return self.clip.prompts(classnames, len(self.ctx), self.position)

    def start(self, *blocks):
        """H0 (C, L, d): hidden states entering the top blocks for the learned context; the mask (C, L, 1) of
        the context positions (R2); EOT positions. blocks: (ClassPrompts, rows or None) pairs, e.g. the
        observed classes and the sampled unseen words, padded after their EOT (harmless: causal mask)."""
        states = []
        for prompts, rows in blocks:
            x = prompts.embed(self.ctx, rows)
            H = common.hidden_states(self.clip, x, self.layer)
            mask = prompts.context_mask(rows)  # reconstruction: SGLD moves the context positions only (R2)
            states.append((H.float(), mask, prompts.eot if rows is None else prompts.eot[rows]))
        L = max(H.shape[1] for H, _, _ in states)
        pad = lambda t: F.pad(t, (0, 0, 0, L - t.shape[1]))
        return (torch.cat([pad(H) for H, _, _ in states]), torch.cat([pad(m) for _, m, _ in states]),
                torch.cat([eot for _, _, eot in states]))

    def features(self, H, eot):
        """g(H): per-image class text features (N, C, D) from hidden states (N, C, L, d)."""
        N, C = H.shape[:2]
        out = common.encode_hidden(self.clip, H.flatten(0, 1), eot.repeat(N), self.layer)
        return out.view(N, C, -1)

    def sample(self, image_feats, H0, mask, eot, gen):
        """One SGLD chain per image, from H0, on p(H | x) ~ exp(-E(x, H)); returns H0 + stopgrad(H_K - H0) (R5)."""
        # reconstruction: alpha in units of the moved states' mean square (R3)
        alpha = self.step_size * (H0.detach().pow(2) * mask).sum() / (mask.sum() * H0.shape[-1])
        H0 = H0.unsqueeze(0).expand(len(image_feats), -1, -1, -1)
        s = self.clip.logit_scale
        H = sgld(H0, lambda H: energy(image_feats, self.features(H, eot), s), self.steps, float(alpha), mask, gen)
        return H0 + (H - H0).detach()  # reconstruction: gradients reach phi through H0, not the chain (R5)

    def mean_logits(self, image_feats, classnames):
        """Logits of the learned context itself, without sampling (CoOp's classifier)."""
        return common.cosine_logits(image_feats, self.prompts(classnames).features(self.ctx), self.clip.logit_scale)


# --------------------------------------------------------------------------------------------------
# Objective (Eq. 8, reconstructed R6) and prediction (R8)
# --------------------------------------------------------------------------------------------------
def empl_loss(model, observed, vocab, image_feats, labels, k, lam, word_gen, noise_gen):
    unseen = torch.randperm(len(vocab.eot), generator=word_gen)[:k]     # U_i: k unseen words for this task
    H0, mask, eot = model.start((observed, None), (vocab, unseen))       # the task's classes: V_i then U_i
    H = model.sample(image_feats, H0, mask, eot, noise_gen)              # H ~ p_phi(H | x), Eq. (9)
    # reconstruction: one chain per image during training (R5)
    logits = pair_logits(image_feats, model.features(H, eot), model.clip.logit_scale)
    n_obs = len(observed.eot)
    ce = F.cross_entropy(logits[:, :n_obs], labels)                      # Eq. (8), first term: CE over V_i
    # reconstruction: unseen term = -log p(V_i|x) over V_i u U_i = softplus(E_V(x) - E_U(x))  (R6)
    unseen_term = F.softplus(torch.logsumexp(logits[:, n_obs:], -1) - torch.logsumexp(logits[:, :n_obs], -1))
    return ce + lam * unseen_term.mean()                                 # Eq. (8): CE + lambda * unseen term


@torch.no_grad()
def predict(model, classnames, image_feats, samples, gen, budget=8192):
    """log p(y|x), p averaged over `samples` chains per image; images in chunks of ~budget sequences.
    reconstruction: average of probabilities, not of features or logits (R8)."""
    H0, mask, eot = model.start((model.prompts(classnames), None))
    out = []
    for x in image_feats.split(max(1, budget // (len(eot) * samples))):
        xs = x.repeat(samples, 1)
        H = model.sample(xs, H0, mask, eot, gen)
        probs = pair_logits(xs, model.features(H, eot), model.clip.logit_scale).float().softmax(-1)
        out.append(probs.view(samples, len(x), -1).mean(0).log())
    return torch.cat(out)


@torch.no_grad()
def spread(model, classnames, image_feats, samples, gen):
    """Diversity of the sampled prompts on up to 64 images: std of the context states across chains and their
    displacement from H0 (both relative to the states' rms), and 1 - cos between two chains' text features."""
    H0, mask, eot = model.start((model.prompts(classnames), None))
    x = image_feats[:64].repeat(samples, 1)
    H = model.sample(x, H0, mask, eot, gen)                                        # (S*N, C, L, d)
    rms = lambda t: ((t.pow(2) * mask).mean((0, -1)).sum() / mask.sum()).sqrt()    # over context positions
    g = F.normalize(model.features(H, eot), dim=-1).view(samples, len(x) // samples, len(eot), -1)
    H = H.view(samples, -1, *H0.shape)
    return {"samples": samples, "hidden_relative_std": float(rms((H - H.mean(0)).flatten(0, 1)) / rms(H0[None])),
            "displacement_relative": float(rms((H - H0).flatten(0, 1)) / rms(H0[None])),
            "text_feature_1_minus_cos": float(1 - (g[0] * g[1]).sum(-1).mean())}


# --------------------------------------------------------------------------------------------------
# Vocabulary, initialisation, run
# --------------------------------------------------------------------------------------------------
def open_vocabulary(spec, dataset_names, pool, seed):
    """Unseen words: the vocabulary minus every class name of the dataset (a seeded subset if pool > 0).
    reconstruction: the paper's vocabulary is unknown (R7)."""
    if spec == "wordnet":
        words = data.wordnet_nouns()
    elif spec == "imagenet":
        words = list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)
    else:
        words = data.read_names(spec)
    key = lambda name: " ".join(name.replace("_", " ").split()).lower()  # as ClassPrompts will spell it
    taken = {key(n) for n in dataset_names}
    words = [w for w in words if key(w) not in taken]
    if not words:
        raise common.UserError(f"the vocabulary {spec!r} holds no word outside the dataset's class names")
    if 0 < pool < len(words):
        words = [words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))[:pool]]
    return words


def initial_context(args, clip):
    """(ctx, position): CoOp's "a photo of a" or a coop.py prompt.pt, checked against this CLIP."""
    if not args.init_from:
        return common.words_to_embeddings(clip, args.ctx_init), "end"
    if not os.path.isfile(args.init_from):
        raise common.UserError(f"--init-from {args.init_from} does not exist (give the prompt.pt that coop.py wrote)")
    try:
        saved = torch.load(args.init_from, map_location="cpu")
        ctx = saved["ctx"]
    except (OSError, RuntimeError, KeyError, TypeError) as err:
        raise common.UserError(f"--init-from {args.init_from}: not a coop.py prompt.pt ({err})") from None
    if saved.get("csc") or ctx.dim() != 2:
        raise common.UserError(f"--init-from {args.init_from} holds a class-specific context; EMPL needs a shared "
                               f"one (train coop.py without --csc)")
    if ctx.shape[1] != clip.ctx_dim or (saved.get("backbone"), saved.get("weights")) != (clip.backbone, clip.weights):
        raise common.UserError(f"--init-from {args.init_from} was trained with {saved.get('backbone')} "
                               f"({saved.get('weights')}, width {ctx.shape[1]}); this run uses {clip.backbone} "
                               f"({clip.weights}, width {clip.ctx_dim}): train coop.py with the same backbone")
    return ctx, saved.get("position", "end")


def run(args, seed):
    out = common.claim_run_dir(args, "empl", seed)
    task = common.prepare(args, seed)
    clip, device = task.clip, task.clip.device
    ctx, position = initial_context(args, clip)
    model = EMPL(clip, ctx, position, args.sgld_layers, args.sgld_steps, args.sgld_step_size)
    observed = model.prompts(task.classnames)
    vocab = common.ClassPrompts(clip, open_vocabulary(args.vocab, task.dataset.classnames, args.vocab_pool, seed),
                                len(model.ctx), position)
    k = min(args.unseen_per_batch, len(vocab.eot))
    word_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed)

    def loss(feats, labels, wg=word_gen, ng=noise_gen):
        return empl_loss(model, observed, vocab, feats, labels, k, args.lam, wg, ng)

    start, feature_s = time.perf_counter(), task.cache.seconds
    stats = common.fit([model.ctx], loss, lambda epoch: (task.train_features(epoch), task.labels), n=len(task.train),
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, precision=clip.precision,
                       seed=seed, device=device, desc=f"EMPL seed {seed}")
    task.times["training_s"] = time.perf_counter() - start - (task.cache.seconds - feature_s)

    # the same run's cost relative to plain CoOp: a training step (forward + backward) and the evaluation
    x, y = task.train_features(0)[:args.batch_size], task.labels[:args.batch_size]
    def step(loss_fn):
        with common.autocast(device, clip.precision):
            value = loss_fn()
        value.backward()
        model.ctx.grad = None
    coop_step = common.seconds(lambda: step(lambda: F.cross_entropy(common.cosine_logits(x, observed.features(model.ctx),
                                                                                  clip.logit_scale), y)), device)
    empl_step = common.seconds(lambda: step(lambda: loss(x, y, torch.Generator().manual_seed(0),
                                                  torch.Generator(device=device).manual_seed(0))), device)
    without = task.evaluate(lambda names, feats: model.mean_logits(feats, names))  # the learned context, no SGLD
    coop_eval_s = task.times["evaluation_s"]
    eval_gen = torch.Generator(device=device).manual_seed(seed)
    metrics = task.evaluate(lambda names, feats: predict(model, names, feats, args.samples, eval_gen))
    first = next(iter(task.evals.values()))
    diversity = spread(model, first.classnames, task.eval_features(first), max(2, args.samples),
                       torch.Generator(device=device).manual_seed(seed))
    common.save_prompt(out, task, "empl", model.ctx, position)
    extra = {"train": stats, "metrics_without_sampling": without, "prompt_spread": diversity,
             "sgld": {"steps": args.sgld_steps, "step_size": args.sgld_step_size, "layers": args.sgld_layers,
                      "enters_block": model.layer, "samples_test": args.samples, "chains_per_image_train": 1,
                      "acts_on": "context-token hidden states"},
             "unseen_words": {"vocab": args.vocab, "words": len(vocab.eot), "per_batch": k, "lam": args.lam},
             "cost_vs_coop": {"train_step_s": empl_step, "coop_train_step_s": coop_step,
                              "train_step_ratio": empl_step / coop_step, "eval_s": task.times["evaluation_s"],
                              "coop_eval_s": coop_eval_s, "eval_ratio": task.times["evaluation_s"] / coop_eval_s},
             "nearest_words": common.nearest_words(clip, model.ctx.detach())}
    common.write_results(out, task, "empl", metrics, extra)
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "empl", run)


if __name__ == "__main__":
    main()
