"""CoCoOp -- Conditional Prompt Learning for Vision-Language Models.
Zhou, Yang, Loy, Liu. CVPR 2022, arXiv 2203.05557. Official code: github.com/KaiyangZhou/CoOp, pinned below.

CoOp's learnable context plus a light Meta-Net pi on the image feature, so that every image gets its own
prompts (paper §3.2; the lines below follow the official forward pass):
    pi(x)    = W_2 ReLU(W_1 z),  z = f(x) / ||f(x)||      Meta-Net: Linear(d_v, d_v/16) -> ReLU -> Linear(d_v/16, d)
    v_m(x)   = v_m + pi(x),  m = 1..M                     the same shift for every context token
    t_i(x)   = [v_1(x)] ... [v_M(x)] [CLASS_i] .
    p(y=i|x) = exp(s cos(f(x), g(t_i(x)))) / sum_j exp(s cos(f(x), g(t_j(x))))      s = CLIP's logit scale
    L        = cross-entropy(p(y|x), y)
Only the context v and the Meta-Net train; CLIP is frozen. Faithful to the official recipe: M = 4 from "a photo
of a", class token at the end, Meta-Net on the L2-normalised image feature with PyTorch's default Linear
init, SGD 0.002 + one warm-up epoch at 1e-5 + cosine, 10 epochs, batch 1, ViT-B/16, base-to-new (the protocol
this paper introduced) with 16 shots; the last epoch's prompt is evaluated. Sources:
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/cocoop.py#L75-L102
    PromptLearner: the context init and the Meta-Net (linear1 -> relu -> linear2)
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/cocoop.py#L144-L194
    forward: ctx_shifted = ctx + meta_net(normalised f(x)); per image, the C prompts through the text encoder
https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml
    and scripts/cocoop/base2new_train.sh (16 shots, SUBSAMPLE_CLASSES base, seeds 1-3)
Different: the official code encodes the C prompts of each image in a Python loop; here the B x C prompts of a
batch go through the text tower together, in passes of at most PROMPTS_PER_PASS prompts (same numbers, bounded
memory on large class lists). The image tower is frozen, so its features come from the feature cache (common.py);
fp32 master weights under autocast instead of the official fp16 context and Meta-Net.

    python cocoop.py --dataset eurosat                    # base-to-new, 16 shots, ViT-B/16
    python cocoop.py --dataset imagenet --protocol fewshot --eval-on imagenetv2 imagenet_sketch   # domain gen.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PROMPTS_PER_PASS = 1000  # text-tower batch: the official code's C prompts per image, here shared by several images
# KDPL's CoCoOp student (kdpl.py --student cocoop): miccunifi/KDPL src/configs/trainers/CoCoOp_KDPL/
# vit_b32_c4_ep10_batch1_ctxv1.yaml (the official CoCoOp config with a ViT-B/32)
KDPL_CONFIG = dict(backbone="ViT-B-32", epochs=10, batch_size=1, lr=0.002, ctx_init="a photo of a")


def parse_args(argv=None):
    p = common.base_parser("CoCoOp: CoOp's context conditioned on each image by a Meta-Net (CVPR 2022).",
                           protocol="base2new")  # scripts/cocoop/base2new_*.sh: the paper's main protocol
    p.set_defaults(epochs=10, batch_size=1, lr=0.002)  # vit_b16_c4_ep10_batch1_ctxv1.yaml
    p.add_argument("--ctx-init", default="a photo of a",  # CTX_INIT of the same config (N_CTX 4)
                   help='initialise the context from words (M = number of words); "" = random N(0, 0.02^2)')
    p.add_argument("--n-ctx", type=int, help="context tokens M when --ctx-init is empty (configs c4/c8/c16)")
    args = p.parse_args(argv)
    if args.ctx_init and args.n_ctx not in (None, len(args.ctx_init.split())):
        p.error(f'--n-ctx {args.n_ctx} contradicts --ctx-init "{args.ctx_init}"; the official code silently '
                f'ignores N_CTX in that case, here you choose one')
    args.n_ctx = len(args.ctx_init.split()) if args.ctx_init else (args.n_ctx or 4)
    if args.epochs < 1 or args.n_ctx < 1:
        p.error("--epochs and --n-ctx must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------
# The method (paper §3.2): the context, the Meta-Net, the conditional prompts, the loss
# --------------------------------------------------------------------------------------------------
class CoCoOp(nn.Module):
    """The learnable context v, the Meta-Net pi and the conditional prompts t_i(x) built around them."""

    def __init__(self, clip, classnames, n_ctx=4, ctx_init="a photo of a", seed=1):
        super().__init__()
        self.clip, self.classnames = clip, list(classnames)
        if ctx_init:
            ctx = common.words_to_embeddings(clip, ctx_init)  # the embeddings of the init words
        else:
            ctx = torch.randn(n_ctx, clip.ctx_dim, generator=common.generator(seed, "context init")) * 0.02
        self.ctx = nn.Parameter(ctx.to(clip.device))
        self.n_ctx = len(ctx)  # from words: their token count
        d_v = clip.embed_dim  # the image feature's width (visual.output_dim)
        with common.global_rng(seed, "meta-net init"):  # nn.Linear draws its default init from the global generator
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(d_v, d_v // 16)), ("relu", nn.ReLU(inplace=True)),
                ("linear2", nn.Linear(d_v // 16, clip.ctx_dim))])).to(clip.device)
        self.prompts = common.ClassPrompts(clip, classnames, self.n_ctx)  # t_i of the training classes

    def class_prompts(self, classnames=None):
        """The training classes' prompts, or those of another class list (a test set's)."""
        if classnames is None or list(classnames) == self.classnames:
            return self.prompts
        return common.ClassPrompts(self.clip, classnames, self.n_ctx)

    def logits(self, image_feats, classnames=None, rows=None):
        """s cos(f(x), g(t_i(x))) (B, C) over the training classes (or `classnames`, or the selected `rows`)."""
        prompts = self.class_prompts(classnames)
        z = F.normalize(image_feats.float(), dim=-1)              # the Meta-Net's input: the normalised f(x)
        ctx = self.ctx + self.meta_net(z)[:, None]                 # v_m(x) = v_m + pi(x): (B, M, d)
        eot = prompts.eot if rows is None else prompts.eot[rows]
        per_pass = max(1, PROMPTS_PER_PASS // len(eot))            # images whose C prompts share a text pass
        logits = []
        for x, v in zip(image_feats.split(per_pass), ctx.split(per_pass)):
            x_prompts = prompts.embed_per_image(v, rows)            # t_i(x) for every image and class: (b, C, L, d)
            text = common.encode_text(self.clip, x_prompts.flatten(0, 1), eot.repeat(len(x)))
            # each image against its own C text features: (b, 1, D) x (b, C, D) -> (b, 1, C)
            logits.append(common.cosine_logits(x[:, None], text.view(len(x), len(eot), -1), self.clip.logit_scale))
        return torch.cat(logits)[:, 0]

    def trainable(self):
        return [self.ctx, *self.meta_net.parameters()]


def cocoop_loss(model, image_feats, labels):
    return F.cross_entropy(model.logits(image_feats), labels)  # L = CE(p(y|x), y)


IMAGE_INPUT = "features"  # what logits() takes: cached image features (kdpl.py)


def add_student_flags(p):
    """The flags of KDPL's CoCoOp student (kdpl.py --student cocoop): its context's init words."""
    p.add_argument("--ctx-init", help="words initialising the student's context (M = their token count)")


def kdpl_student(clip, names, args, seed):
    """The student KDPL trains (kdpl.py --student cocoop): CoCoOp over the training names."""
    return CoCoOp(clip, names, n_ctx=None, ctx_init=args.ctx_init, seed=seed)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, the training and evaluation run, results
# --------------------------------------------------------------------------------------------------
def saved_model(exp, saved):
    """The CoCoOp of a prompt.pt (cocoop.py's or KDPL's): the context and the Meta-Net's weights."""
    model = CoCoOp(exp.clip, exp.classnames, saved["n_ctx"], ctx_init="", seed=exp.seed)
    model.load_state_dict({k: saved[k] for k in model.state_dict()})
    return model


def run(args, seed):
    out = common.claim_run_dir(args, "cocoop", seed)
    exp = common.prepare(args, seed)
    saved = exp.load_prompt("cocoop")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        model = CoCoOp(exp.clip, exp.classnames, args.n_ctx, args.ctx_init, seed)
        extra = {"train": exp.fit(model.trainable(), lambda feats, labels: cocoop_loss(model, feats, labels),
                                  desc="CoCoOp")}
    metrics = exp.evaluate(lambda names, feats: model.logits(feats, names))
    extra["nearest_words"] = common.nearest_words(exp.clip, model.ctx.detach())  # of v, before any pi(x) shift
    if not saved:
        meta_net = {k: v for k, v in model.state_dict().items() if k != "ctx"}  # "meta_net.linear1.weight", ...
        common.save_prompt(out, exp, "cocoop", model.ctx, **meta_net, ctx_init=args.ctx_init)
    common.write_results(out, exp, "cocoop", metrics, extra)
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "cocoop", run)


if __name__ == "__main__":
    main()
