"""EMPL -- Energy-based Multi-prompt Learning.
Chen, Huang, Guan, Lin, Luo. "A Retrospect to Multi-prompt Learning across Vision and Language", ICCV 2023,
arXiv 2511.00191. NO public code exists and the exact text of the paper's equations was not available: this
file is a RECONSTRUCTION from the paper's description of its method. What that description states:
  * EMPL is a plug-in on a trained single prompt: frozen CLIP, CoOp's learnable context phi (nothing else
    trains, no extra parameters), initialised from a trained CoOp (or ProDA) checkpoint;
  * an energy E_phi(X, H) of images X and prompt embeddings H from CLIP's contrastive score; prompts drawn from
    p_phi(H | X) ~ exp(-E_phi(X, H)) (Eq. 6-7) by SGLD (Eq. 9: gradient steps on E plus Gaussian noise) on the
    prompt inside the text transformer, in its top 2 blocks (Table 4: lower blocks cost more for no gain);
  * open-vocabulary meta-learning (Eq. 8): each batch is a task T_i with observed classes V_i and K - K' unseen
    words U_i from an open vocabulary; loss = CE over V_i with the sampled prompts + lambda * (a term on U_i,
    "maximising uncertainty over unseen classes"), lambda = 0.1 (Fig. 6); Prop. 3: it correlates in-domain pairs
    negatively with unseen-class pairs; several sampled prompts at test, more helping with diminishing returns
    (Fig. 7); cost: about 3x CoOp's training time and 2x its inference prompts.
Reconstructed (each also marked "# reconstruction:" where it is made):
  R0 Eq. 9 in the standard Langevin form: H <- H - (alpha/2) dE/dH + sqrt(alpha) eps, eps ~ N(0, I).
  R1 E(X, H) = -mean_{x in X} logsumexp_c s*cos(f(x), g(H_c)) over the task's classes (the free energy of CLIP's
     classifier; label-free, so training and test sample alike); pair energy -s*cos(f(x), g(H_c)).
  R2 X = all images of a task (the paper writes E(X, H; T_i)): --chain task (default), ONE chain of the task's class
     prompts for every image of the batch. --chain image: a chain per image, E(x, H), for comparison (costlier).
  R3 SGLD moves the hidden states of the context tokens entering the top --sgld-layers blocks only.
  R4 alpha = step_size * mean(H0^2) over those states (Eq. 9 in the hidden states' units); 5 steps, 1e-3.
  R5 the loss sees H0(phi) + stopgrad(H_K - H0): gradients reach phi through the chain's start, not the chain.
  R6 V_i = the classes present in the batch (labels renumbered); U_i = --unseen-per-batch (8) words per step from
     WordNet nouns minus ALL the dataset's class names (--vocab imagenet|FILE).
  R7 --unseen-term observed (default): -log p(V_i | x) under the softmax over V_i u U_i = softplus(E_V - E_U),
     which lowers the energy of observed pairs and raises that of unseen ones (a reading of Prop. 3); entropy:
     log|U_i| - H(p(. | x) over U_i), the literal "maximising uncertainty", leaving the observed-unseen gap alone.
  R8 test: p(y|x) = mean over --test-chains (2) chains of softmax_c s*cos(f(x), g(H^k_c)), chains conditioned on
     (--test-condition) train (default): the training images, drawn once per class list, so each test image is
     classified alone, as CoOp and ProDA do; image: each test image alone; batch: each test batch, TRANSDUCTIVE.
  R9 epochs and optimiser: coop.py's recipe (paper: ~3x CoOp's training time, i.e. same schedule, dearer steps).

    python coop.py --dataset eurosat --protocol base2new --shots 16        # EMPL starts from this prompt
    python empl.py --dataset eurosat --shots 16 --init-from runs/coop/eurosat/base2new/shots_16/seed_1/prompt.pt
"""
import json
import math
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

EPOCHS_BASE2NEW = 200  # reconstruction: coop.py's recipe (R9); few-shot: common.FEWSHOT_EPOCHS
TESTS = {"train": "test chains drawn once from the training images, each image alone",  # R8, as printed
         "image": "test chains per test image, each image alone", "batch": "test chains per batch, TRANSDUCTIVE"}


def parse_args(argv=None):
    p = common.base_parser("EMPL: energy-based multi-prompt learning with SGLD-sampled prompts (ICCV 2023).")
    p.set_defaults(protocol="base2new")  # the paper's main protocol
    p.add_argument("--init-from", help="prompt.pt of the coop.py run to start from, as the paper does: same CLIP, "
                                       "dataset, protocol, shots and seed ({seed} in the path: the run's seed)")
    p.add_argument("--ctx-init", help='context words when there is no --init-from (default "a photo of a")')
    p.add_argument("--chain", default="task", choices=["task", "image"],
                   help="task: one SGLD chain per batch, shared by its images; image: one chain per image (R2)")
    p.add_argument("--sgld-layers", type=int, default=2, help="top text blocks SGLD acts in (paper Table 4: 2)")
    # reconstruction: the paper's SGLD schedule, |U_i| and test batch are unknown (R4, R6, R8)
    p.add_argument("--sgld-steps", type=int, default=5, help="SGLD steps per chain")
    p.add_argument("--sgld-step-size", type=float, default=1e-3, help="alpha, in units of the states' mean square")
    p.add_argument("--test-chains", "--samples", type=int, default=2,
                   help="chains per draw of test prompts; 2 = the paper's 2x inference prompts")
    p.add_argument("--test-condition", default="train", choices=list(TESTS),  # R8
                   help="what the test chains are conditioned on. " + "; ".join(f"{k}: {v}" for k, v in TESTS.items()))
    p.add_argument("--test-batch-size", type=int, default=100, help="test images sharing chains (condition batch)")
    p.add_argument("--unseen-per-batch", type=int, default=8, help="unseen words per task (paper sweeps 1, 2, 4, 8)")
    p.add_argument("--unseen-term", default="observed", choices=["observed", "entropy"],
                   help="observed: -log p(observed classes | x); entropy: maximise entropy over the unseen words (R7)")
    p.add_argument("--lam", type=float, default=0.1, help="weight of the unseen-word term (paper Fig. 6: 0.1)")
    p.add_argument("--vocab", default="wordnet", help="open vocabulary: wordnet, imagenet, or a names file")
    p.add_argument("--vocab-pool", type=int, default=0, help="keep a seeded subset of this many words (0 = all)")
    args = p.parse_args(argv)
    if args.ctx_init and args.init_from:
        p.error("--ctx-init and --init-from both set the starting context; choose one")
    args.ctx_init = None if args.init_from else (args.ctx_init or "a photo of a")
    for flag in ("sgld_layers", "test_chains", "test_batch_size", "unseen_per_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.sgld_steps, args.sgld_step_size, args.lam, args.vocab_pool) < 0:
        p.error("--sgld-steps, --sgld-step-size, --lam and --vocab-pool must not be negative")
    common.resolve_epochs(p, args, base2new=EPOCHS_BASE2NEW)
    return args


# --------------------------------------------------------------------------------------------------
# The method: energy (Eq. 6-7, reconstructed R1) and SGLD (Eq. 9)
# --------------------------------------------------------------------------------------------------
def logits(X, text_feats, logit_scale):
    """s*cos(f(x), g(H_c)) in fp32, CLIP's classifier per chain: X (K, M, D) the images chain k serves, its class
    features (K, C, D) -> (K, M, C)."""
    return common.cosine_logits(X, text_feats, logit_scale)


def energy(X, text_feats, logit_scale):
    """E(X, H) = -mean_{x in X} logsumexp_c s*cos(f(x), g(H_c)), one value per chain (K,)  (R1)."""
    return -torch.logsumexp(logits(X, text_feats, logit_scale), dim=-1).mean(-1)  # reconstruction: R1


def sgld(H0, energy_fn, steps, alpha, mask, gen, noise_scale=1.0):
    """Eq. (9) (R0): H <- H - (alpha/2) dE/dH + sqrt(alpha) eps on the positions in mask, a chain per row of
    energy_fn's output (chains do not interact: the gradient of the sum is each chain's own); noise from gen."""
    H = H0.detach().float()
    for _ in range(steps):
        with torch.enable_grad():
            H.requires_grad_(True)
            grad, = torch.autograd.grad(energy_fn(H).sum(), H)
        eps = torch.randn(H.shape, generator=gen, device=gen.device).to(H.device)
        H = (H + mask * (-alpha / 2 * grad + alpha ** 0.5 * noise_scale * eps)).detach()  # reconstruction: R0
    return H


# --------------------------------------------------------------------------------------------------
# The prompt module: CoOp's context, entering the text tower's top blocks
# --------------------------------------------------------------------------------------------------
def context_mask(prompts, rows=None):
    """(R, L, 1): 1 at the positions prompts.embed() fills with context, 0 at SOS, class, "." and EOT."""
    emb, _ = prompts.token_embeddings(rows)
    mask = torch.zeros(emb.shape[0], emb.shape[1], 1, device=emb.device)
    if prompts.position == "end":
        mask[:, 1:1 + prompts.n_ctx] = 1
        return mask
    lens = prompts.name_lens if rows is None else [prompts.name_lens[int(r)] for r in rows]
    half = prompts.n_ctx // 2
    for i, n in enumerate(lens):
        if prompts.position == "middle":
            mask[i, 1:1 + half] = mask[i, 1 + half + n:1 + prompts.n_ctx + n] = 1
        else:
            mask[i, 1 + n:1 + n + prompts.n_ctx] = 1
    return mask


class EMPL(nn.Module):
    def __init__(self, clip, ctx, position="end", sgld_layers=2, steps=5, step_size=1e-3, chain="task"):
        super().__init__()
        n_layers = len(clip.text.transformer.resblocks)
        if not 1 <= sgld_layers <= n_layers:
            raise common.UserError(f"--sgld-layers {sgld_layers}: this text tower has {n_layers} blocks")
        self.clip, self.position, self.steps, self.step_size, self.chain = clip, position, steps, step_size, chain
        self.layer = n_layers - sgld_layers  # SGLD acts on the states entering block `layer`
        self.ctx = nn.Parameter(ctx.to(clip.device).float().clone())

    def prompts(self, classnames):
        """The prompt layout of a class list (built by the caller once per list: training, each test set)."""
        return common.ClassPrompts(self.clip, classnames, len(self.ctx), self.position)

    def start(self, *blocks):
        """H0 (C, L, d): hidden states entering the top blocks for the learned context; the mask (C, L, 1) of the
        context positions (R3); EOT positions. blocks: (ClassPrompts, rows or None) pairs, e.g. the observed
        classes and the sampled unseen words, padded after their EOT (harmless: causal mask)."""
        states = []
        for prompts, rows in blocks:
            H = common.hidden_states(self.clip, prompts.embed(self.ctx, rows), self.layer)
            mask = context_mask(prompts, rows)  # reconstruction: SGLD moves the context positions only (R3)
            states.append((H.float(), mask, prompts.eot if rows is None else prompts.eot[rows]))
        L = max(H.shape[1] for H, _, _ in states)
        pad = lambda t: F.pad(t, (0, 0, 0, L - t.shape[1]))
        return (torch.cat([pad(H) for H, _, _ in states]), torch.cat([pad(m) for _, m, _ in states]),
                torch.cat([eot for _, _, eot in states]))

    def features(self, H, eot):
        """g(H): class text features (K, C, D) of K chains' hidden states (K, C, L, d)."""
        K, C = H.shape[:2]
        return common.encode_hidden(self.clip, H.flatten(0, 1), eot.repeat(K), self.layer).view(K, C, -1)

    def serve(self, image_feats, chains, per_image=None):
        """The images each chain is conditioned on and serves: a task chain (chains, N, D) sees them all (R2); image
        chains (chains * N, 1, D), chain-major, one image each. per_image: None follows --chain."""
        if not (self.chain == "image" if per_image is None else per_image):  # reconstruction: a chain per task (R2)
            return image_feats.unsqueeze(0).expand(chains, -1, -1)
        return image_feats.repeat(chains, 1).unsqueeze(1)

    def sample(self, X, H0, mask, eot, gen):
        """One SGLD chain per row of X, from H0, on p(H | X) ~ exp(-E(X, H)); returns H0 + stopgrad(H_K - H0) (R5)."""
        # reconstruction: alpha in units of the moved states' mean square (R4)
        alpha = self.step_size * (H0.detach().pow(2) * mask).sum() / (mask.sum() * H0.shape[-1])
        H0 = H0.unsqueeze(0).expand(len(X), -1, -1, -1)
        E = lambda H: energy(X, self.features(H, eot), self.clip.logit_scale)  # E(X, H) of each chain (R1)
        H = sgld(H0, E, self.steps, float(alpha), mask, gen)
        return H0 + (H - H0).detach()  # reconstruction: gradients reach phi through H0, not the chain (R5)

    def mean_logits(self, image_feats, classnames):
        """Logits of the learned context itself, without sampling (CoOp's classifier), in fp32."""
        return common.cosine_logits(image_feats, self.prompts(classnames).features(self.ctx), self.clip.logit_scale)


# --------------------------------------------------------------------------------------------------
# Objective (Eq. 8, reconstructed R6-R7) and prediction (R8)
# --------------------------------------------------------------------------------------------------
def empl_loss(model, observed, vocab, image_feats, labels, k, lam, word_gen, noise_gen, term="observed"):
    classes = labels.unique()                                            # V_i: the classes of the task (R6)
    unseen = torch.randperm(len(vocab.eot), generator=word_gen)[:k]     # U_i: k unseen words for this task
    H0, mask, eot = model.start((observed, classes), (vocab, unseen))    # the task's prompts: V_i then U_i
    X = model.serve(image_feats, 1)                                      # the task's images X
    H = model.sample(X, H0, mask, eot, noise_gen)                        # H ~ p_phi(H | X), Eq. (9)
    z = logits(X, model.features(H, eot), model.clip.logit_scale).reshape(len(labels), -1)
    n = len(classes)
    ce = F.cross_entropy(z[:, :n], torch.searchsorted(classes, labels))  # Eq. (8), first term: CE over V_i
    if term == "observed":  # reconstruction: -log p(V_i | x) over V_i u U_i = softplus(E_V(x) - E_U(x)) (R7)
        unseen_term = F.softplus(torch.logsumexp(z[:, n:], -1) - torch.logsumexp(z[:, :n], -1))
    else:                   # reconstruction: log|U_i| - entropy of p(. | x) over U_i (R7)
        logp = z[:, n:].log_softmax(-1)
        unseen_term = math.log(len(unseen)) + (logp.exp() * logp).sum(-1)
    return ce + lam * unseen_term.mean()                                 # Eq. (8): CE + lambda * unseen term


@torch.no_grad()
def predict(model, classnames, image_feats, chains, gen, batch_size=100, condition="batch", stats=None):
    """log p(y|x), p averaged over `chains` sampled prompt sets (R8), the chains conditioned on `condition`: training
    features (drawn once, shared by every test image), "image" (each test image alone; batches only bound memory) or
    "batch" (each test batch of batch_size from a seeded shuffle: transductive). stats (a dict) receives the test
    batches and the number of prompts sampled."""
    H0, mask, eot = model.start((model.prompts(classnames), None))
    C, S, sampled = len(eot), chains, 0
    once, per_image = torch.is_tensor(condition), isinstance(condition, str) and condition == "image"
    if once:  # reconstruction: p(H | training images), drawn once: no test image sees another (R8)
        H = model.sample(model.serve(condition, S, per_image=False), H0, mask, eot, gen)
        g, sampled = model.features(H, eot), S * C
    batch_size = max(1, 8192 // (C * S)) if per_image else batch_size
    order = torch.randperm(len(image_feats), generator=gen).to(image_feats.device)  # reconstruction: R8
    out = torch.empty(len(image_feats), C, device=image_feats.device)
    for rows in order.split(batch_size):
        X = model.serve(image_feats[rows], S, per_image)
        if not once:  # p(H | this test image, or this test batch: transductive)
            H = model.sample(X, H0, mask, eot, gen)
            g, sampled = model.features(H, eot), sampled + H.shape[0] * C
        probs = logits(X, g, model.clip.logit_scale).softmax(-1)  # reconstruction: mean of probabilities (R8)
        out[rows] = probs.reshape(S, len(rows), C).mean(0).log()
    if stats is not None:
        stats.update(test_batches=math.ceil(len(image_feats) / batch_size), prompts_sampled=sampled)
    return out


@torch.no_grad()
def spread(model, classnames, image_feats, chains, gen):
    """Diversity of `chains` (>= 2) prompt sets sampled for up to 64 images: std of the context states across chains
    and their displacement from H0 (relative to the states' rms), 1 - cos between two chains' text features."""
    H0, mask, eot = model.start((model.prompts(classnames), None))
    H = model.sample(model.serve(image_feats[:64], chains), H0, mask, eot, gen)    # (K, C, L, d)
    rms = lambda t: ((t.pow(2) * mask).mean((0, -1)).sum() / mask.sum()).sqrt()    # over context positions
    g = F.normalize(model.features(H, eot), dim=-1)
    g, H = g.view(chains, -1, *g.shape[1:]), H.view(chains, -1, *H0.shape)
    return {"chains": chains, "hidden_relative_std": float(rms((H - H.mean(0)).flatten(0, 1)) / rms(H0[None])),
            "displacement_relative": float(rms((H - H0).flatten(0, 1)) / rms(H0[None])),
            "text_feature_1_minus_cos": float(1 - (g[0] * g[1]).sum(-1).mean())}


# --------------------------------------------------------------------------------------------------
# Run plumbing: the open vocabulary, the starting context, the run, results
# --------------------------------------------------------------------------------------------------
def open_vocabulary(spec, dataset_names, pool, seed):
    """Unseen words: the vocabulary minus every class name of the dataset (a seeded subset if pool > 0).
    reconstruction: the paper's vocabulary is unknown (R6)."""
    named = {"wordnet": data.wordnet_nouns, "imagenet": lambda: list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)}
    words = named[spec]() if spec in named else data.read_names(spec)
    taken = {data.prompt_key(n) for n in dataset_names}  # as the tokenizer sees them: "Forest" = "forest"
    words = [w for w in words if data.prompt_key(w) not in taken]
    if not words:
        raise common.UserError(f"the vocabulary {spec!r} holds no word outside the dataset's class names")
    if 0 < pool < len(words):
        words = [words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))[:pool]]
    return words


def initial_context(args, exp):
    """(ctx, position, start): the paper's start, a coop.py prompt.pt (or an empl.py one) checked against this run
    (CLIP, classes, and the dataset, protocol, shots and seed in the results.json beside it), or --ctx-init's words."""
    if not args.init_from:
        print(f'EMPL: the context starts from "{args.ctx_init}"; the paper starts from a trained CoOp prompt '
              f'(--init-from runs/coop/.../prompt.pt)')
        return common.words_to_embeddings(exp.clip, args.ctx_init), "end", {"words": args.ctx_init}
    path = Path(args.init_from.replace("{seed}", str(exp.seed)))  # --seeds: one CoOp run per seed
    beside = path.with_name("results.json")
    if not path.is_file():
        raise common.UserError(f"--init-from {path} does not exist (give the prompt.pt that coop.py wrote)")
    saved = common.read_prompt(path, "--init-from", exp.clip, ["coop", "empl"],
                               "give a coop.py prompt.pt (the paper starts EMPL from a trained CoOp) or an empl.py one")
    if saved["csc"]:
        raise common.UserError(f"--init-from {path}: a class-specific context; EMPL needs a shared one (no --csc)")
    ours = {"dataset": exp.dataset.name, "protocol": args.protocol, "shots": args.shots, "seed": exp.seed}
    theirs = json.loads(beside.read_text()) if beside.is_file() else {}
    differ = [f"{k} {theirs[k]} (this run: {v})" for k, v in ours.items() if k in theirs and theirs[k] != v]
    if not differ and saved.get("classnames") != exp.classnames:  # no results.json: the classes still tell
        differ = [f"classes {saved.get('classnames')} (this run: {exp.classnames})"]
    if differ:
        raise common.UserError(f"--init-from {path} was trained with another setting: {'; '.join(differ)}. Start from "
                               f"the CoOp run of this dataset, protocol, shots and seed (--seeds: .../seed_{{seed}}/)")
    if not theirs:
        print(f"EMPL: no results.json beside --init-from {path}: its shots and seed are not checked")
    return saved["ctx"], saved["position"], dict(ours if theirs else {}, prompt=str(path), method=saved["method"])


def run(args, seed):
    out = common.claim_run_dir(args, "empl", seed)
    exp = common.prepare(args, seed)
    clip = exp.clip
    saved = exp.load_prompt("empl")
    ctx, position, start = (saved["ctx"], saved["position"], None) if saved else initial_context(args, exp)
    model = EMPL(clip, ctx, position, args.sgld_layers, args.sgld_steps, args.sgld_step_size, args.chain)
    if saved:
        extra = {"loaded_from": args.load_prompt}
    else:
        observed = model.prompts(exp.classnames)
        words = open_vocabulary(args.vocab, exp.dataset.classnames, args.vocab_pool, seed)
        vocab = common.ClassPrompts(clip, words, len(model.ctx), position)
        k = min(args.unseen_per_batch, len(vocab.eot))
        word_gen, noise_gen = common.generator(seed, "unseen words"), common.generator(seed, "SGLD noise")
        stats = exp.fit([model.ctx], lambda feats, labels: empl_loss(
            model, observed, vocab, feats, labels, k, args.lam, word_gen, noise_gen, args.unseen_term), desc="EMPL")
        extra = {"started_from": start, "train": stats, "unseen_words": {
            "vocab": args.vocab, "words": len(vocab.eot), "per_batch": k, "term": args.unseen_term, "lam": args.lam}}

    without = exp.evaluate(lambda names, feats: model.mean_logits(feats, names),  # the learned context, no SGLD
                           time_as="evaluation_without_sampling_s")
    condition = exp.train_features(0) if args.test_condition == "train" else args.test_condition
    eval_gen, sampled = common.generator(seed, "test chains"), []

    def predict_fn(names, feats):
        sampled.append({"classes": len(names), "test_images": len(feats)})
        return predict(model, names, feats, args.test_chains, eval_gen, args.test_batch_size, condition, sampled[-1])
    metrics = exp.evaluate(predict_fn)
    first = next(iter(exp.evals.values()))
    diversity = spread(model, first.classnames, exp.eval_features(first), max(2, args.test_chains),
                       common.generator(seed, "spread"))
    if not saved:
        common.save_prompt(out, exp, "empl", model.ctx, position)
    extra.update({
        "metrics_without_sampling": without, "prompt_spread": diversity,
        "sgld": {"steps": args.sgld_steps, "step_size": args.sgld_step_size, "layers": args.sgld_layers,
                 "enters_block": model.layer, "acts_on": "context-token hidden states"},
        "chains": {"mode": args.chain, "train": "one per batch" if args.chain == "task" else "one per image",
                   "observed_classes": "classes of the batch", "test_chains": args.test_chains,
                   "test_condition": args.test_condition, "test": TESTS[args.test_condition],
                   "transductive": args.test_condition == "batch", "test_prompts": dict(zip(exp.evals, sampled))},
        "nearest_words": common.nearest_words(clip, model.ctx.detach())})
    common.write_results(out, exp, "empl", metrics, extra)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    common.main_seeds(args, "empl", run, label=TESTS[args.test_condition])


if __name__ == "__main__":
    main()
