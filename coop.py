"""CoOp -- Learning to Prompt for Vision-Language Models.
Zhou, Yang, Loy, Liu. IJCV 2022, arXiv 2109.01134. Official code: github.com/KaiyangZhou/CoOp, pinned below.

A frozen CLIP classifies with text features of prompts whose words are learned (paper §3.2):
    t_i = [V]_1 [V]_2 ... [V]_M [CLASS_i] .        (context V shared by all classes, or one per class: CSC)
    p(y = i | x) = exp(s * cos(f(x), g(t_i))) / sum_j exp(s * cos(f(x), g(t_j)))      s = CLIP's logit scale
    L = cross-entropy(p(y | x), y)
Only V trains. Faithful to the official recipe: M = 16 with random N(0, 0.02^2) init for few-shot, M = 4 from
"a photo of a" for base-to-new (CoCoOp's protocol), SGD 0.002 + one warm-up epoch at 1e-5 + cosine, batch 32,
epochs 50/100/100/200/200 for 1/2/4/8/16 shots (ImageNet 50), the last epoch's prompt is evaluated. Sources:
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/coop.py#L60-L117
    PromptLearner: the init (L72-L90) and the class-token positions (L118-L182)
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/coop.py#L195-L207
    CustomCLIP.forward: logits = s * norm(f(x)) @ norm(g(t)).T
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/configs/trainers/CoOp/vit_b16_ep50.yaml
    and the other configs/trainers/CoOp/*.yaml (rn50*, vit_b16*, *_ep50, *_ep100, *_ctxv1), scripts/coop/main.sh
Differences: autocast with an fp32 context instead of the official fp16 context, and cached image features
(common.py says why and how).

    python coop.py --dataset eurosat --shots 1
    python coop.py --dataset eurosat --protocol base2new --shots 16
    python coop.py --dataset eurosat --zero-shot            # zero-shot CLIP with CoOp's dataset template
    python coop.py --dataset caltech101 --load-prompt runs/coop/imagenet/fewshot/shots_16/seed_1/prompt.pt
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

EPOCHS_BASE2NEW = 200  # vit_b16_ctxv1 (CoCoOp's CoOp baseline); few-shot: common.FEWSHOT_EPOCHS
# KDPL's CoOp student (kdpl.py --student coop): miccunifi/KDPL src/configs/trainers/CoOp_KDPL/vit_b32_ctxv1.yaml
KDPL_CONFIG = dict(backbone="ViT-B-32", epochs=50, batch_size=32, lr=0.002, ctx_init="a photo of a")


def parse_args(argv=None):
    p = common.base_parser("CoOp: learnable context for a frozen CLIP (IJCV 2022).")
    p.add_argument("--n-ctx", type=int, help="context tokens M (default 16 few-shot, 4 base-to-new)")
    p.add_argument("--ctx-init", help='initialise the context from words, e.g. "a photo of a" (M = number of '
                                      'words); "" = random N(0, 0.02^2). Default: random few-shot, '
                                      '"a photo of a" base-to-new')
    p.add_argument("--class-token-position", default="end", choices=["end", "middle", "front"])
    p.add_argument("--csc", action="store_true", help="class-specific context (one V per class)")
    p.add_argument("--zero-shot", action="store_true", help="no training: zero-shot CLIP with the dataset template")
    args = p.parse_args(argv)
    base2new = args.protocol == "base2new"
    if args.csc and base2new:
        p.error("--csc learns one context per training class, so it has nothing to offer the new classes of "
                "base2new (CoOp issue #69); drop --csc or use --protocol fewshot")
    if args.csc and args.eval_on:
        p.error("--csc learns one context per training class; it cannot be tested on other datasets' classes "
                "(--eval-on); drop one of them")
    if args.zero_shot and args.load_prompt:
        p.error("--zero-shot uses no learned prompt; drop --load-prompt or --zero-shot")
    if args.ctx_init is None:
        args.ctx_init = "a photo of a" if base2new else ""
    if args.n_ctx is None:
        args.n_ctx = len(args.ctx_init.split()) if args.ctx_init else (4 if base2new else 16)
    elif args.ctx_init and args.n_ctx != len(args.ctx_init.split()):
        p.error(f'--n-ctx {args.n_ctx} contradicts --ctx-init "{args.ctx_init}" ({len(args.ctx_init.split())} '
                f'words); the official code silently ignores N_CTX in that case, here you choose one')
    if not args.zero_shot:
        common.resolve_epochs(p, args, base2new=EPOCHS_BASE2NEW)
    return args


# --------------------------------------------------------------------------------------------------
# The method (paper §3.2): the learnable context, its prompts, the loss
# --------------------------------------------------------------------------------------------------
class CoOp(nn.Module):
    """The learnable context V and the prompts built around it."""

    def __init__(self, clip, classnames, n_ctx, ctx_init="", position="end", csc=False, gen=None):
        super().__init__()
        self.clip, self.n_ctx, self.position, self.csc = clip, n_ctx, position, csc
        if ctx_init:
            ctx = common.words_to_embeddings(clip, ctx_init)  # CoOp: embeddings of the init words
            ctx = ctx.expand(len(classnames), -1, -1).clone() if csc else ctx
        else:
            shape = (len(classnames), n_ctx, clip.ctx_dim) if csc else (n_ctx, clip.ctx_dim)
            ctx = torch.randn(shape, generator=gen) * 0.02  # nn.init.normal_(std=0.02), drawn on the CPU
        self.ctx = nn.Parameter(ctx.to(clip.device))
        self.n_ctx = self.ctx.shape[-2]  # from words: their token count
        self.classnames = list(classnames)
        self.prompts = common.ClassPrompts(clip, classnames, self.n_ctx, position)  # t_i of the training classes

    def class_prompts(self, classnames=None):
        """The training classes' prompts, or those of another class list (a test set's)."""
        if classnames is None or list(classnames) == self.classnames:
            return self.prompts
        if self.csc:
            raise common.UserError("a class-specific context exists only for its training classes")
        return common.ClassPrompts(self.clip, classnames, self.n_ctx, self.position)

    def logits(self, image_feats, classnames=None, rows=None):
        """s cos(f(x), g(t_i)) (B, C) over the training classes (or `classnames`, or the selected `rows`)."""
        text = self.class_prompts(classnames).features(self.ctx, rows)  # g(t_i) for every class
        return common.cosine_logits(image_feats, text, self.clip.logit_scale)  # s * cos(f(x), g(t_i))

    def trainable(self):
        return [self.ctx]


def coop_loss(model, image_feats, labels):
    return F.cross_entropy(model.logits(image_feats), labels)  # L = CE(p(y|x), y)


IMAGE_INPUT = "features"  # what logits() takes: cached image features (kdpl.py)


def add_student_flags(p):
    """The flags of KDPL's CoOp student (kdpl.py --student coop): its context's init words."""
    p.add_argument("--ctx-init", help="words initialising the student's shared context (M = their token count)")


def kdpl_student(clip, names, args, seed):
    """The student KDPL trains (kdpl.py --student coop): a shared context from words, class token at the end."""
    return CoOp(clip, names, n_ctx=None, ctx_init=args.ctx_init)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, zero-shot CLIP, the training and evaluation run, results
# --------------------------------------------------------------------------------------------------


def saved_model(exp, saved):
    """The CoOp of a --load-prompt file (a class-specific context only for its own classes)."""
    if saved["csc"] and any(ev.classnames != saved["classnames"] for ev in exp.evals.values()):
        raise common.UserError(f"--load-prompt holds a class-specific context for {len(saved['classnames'])} other "
                               f"classes; it can only be evaluated on the classes it was trained on")
    model = CoOp(exp.clip, saved["classnames"] if saved["csc"] else exp.classnames, saved["n_ctx"],
                 position=saved["position"], csc=saved["csc"], gen=common.generator(exp.seed, "context init"))
    model.ctx.data.copy_(saved["ctx"])
    return model


def zero_shot_predict(exp):
    """Zero-shot CLIP: the dataset's hand-crafted template (CoOp's CUSTOM_TEMPLATES) around each class name."""
    def predict(classnames, feats):
        text = common.encode_texts(exp.clip, [exp.dataset.template.format(c.replace("_", " ")) for c in classnames])
        return common.cosine_logits(feats, text, exp.clip.logit_scale)
    return predict


def run(args, seed):
    method = "zsclip" if args.zero_shot else "coop"
    out = common.claim_run_dir(args, method, seed)
    exp = common.prepare(args, seed)
    if args.zero_shot:
        metrics = exp.evaluate(zero_shot_predict(exp))
        common.write_results(out, exp, method, metrics, {"template": exp.dataset.template})
        return metrics
    saved = exp.load_prompt("coop")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        model = CoOp(exp.clip, exp.classnames, args.n_ctx, args.ctx_init, args.class_token_position, args.csc,
                     gen=common.generator(seed, "context init"))
        extra = {"train": exp.fit([model.ctx], lambda feats, labels: coop_loss(model, feats, labels), desc="CoOp")}
    metrics = exp.evaluate(lambda names, feats: model.logits(feats, names))
    extra["nearest_words"] = common.nearest_words(exp.clip, model.ctx.detach())
    if not model.csc:
        print("nearest words of each context vector:",
              " | ".join(" ".join(w for w, _ in ws) for ws in extra["nearest_words"]))
    if not saved:
        common.save_prompt(out, exp, "coop", model.ctx, model.position, model.csc, ctx_init=args.ctx_init)
    common.write_results(out, exp, method, metrics, extra)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    common.main_seeds(args, "zsclip" if args.zero_shot else "coop", run)


if __name__ == "__main__":
    main()
