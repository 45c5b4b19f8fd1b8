"""CoOp -- Learning to Prompt for Vision-Language Models.
Zhou, Yang, Loy, Liu. IJCV 2022, arXiv 2109.01134. Official code: KaiyangZhou/CoOp.

A frozen CLIP classifies with text features of prompts whose words are learned:
    t_i = [V]_1 [V]_2 ... [V]_M [CLASS_i] .        (context V shared by all classes, or one per class: CSC)
    p(y = i | x) = exp(s * cos(f(x), g(t_i))) / sum_j exp(s * cos(f(x), g(t_j)))      s = CLIP's logit scale
    L = cross-entropy(p(y | x), y)
Only V trains. Faithful to the official recipe (configs/trainers/CoOp/*.yaml, methods.md §2): M = 16 with
random N(0, 0.02^2) init for few-shot, M = 4 from "a photo of a" for base-to-new (CoCoOp's protocol),
SGD 0.002 + warm-up + cosine, batch 32, epochs 50/100/100/200/200 for 1/2/4/8/16 shots (ImageNet 50).
Differences: AMP with fp32 context instead of fp16, and cached image features (common.py).

    python coop.py --dataset eurosat --shots 1
    python coop.py --dataset eurosat --protocol base2new --shots 16
    python coop.py --dataset eurosat --zero-shot            # zero-shot CLIP with CoOp's dataset template
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

EPOCHS_BASE2NEW = 200  # vit_b16_ctxv1 (CoCoOp's CoOp baseline); few-shot: common.FEWSHOT_EPOCHS


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
    if args.ctx_init is None:
        args.ctx_init = "a photo of a" if base2new else ""
    if args.n_ctx is None:
        args.n_ctx = len(args.ctx_init.split()) if args.ctx_init else (4 if base2new else 16)
    elif args.ctx_init and args.n_ctx != len(args.ctx_init.split()):
        p.error(f'--n-ctx {args.n_ctx} contradicts --ctx-init "{args.ctx_init}" ({len(args.ctx_init.split())} '
                f'words); the official code silently ignores N_CTX in that case, here you choose one')
    if args.epochs is None and not args.zero_shot:
        official = common.fewshot_epochs(args.dataset, args.shots)
        args.epochs = EPOCHS_BASE2NEW if base2new and official != common.IMAGENET_EPOCHS else official
        if args.epochs is None:
            p.error(f"no official epoch count for {args.shots} shots; pass --epochs")
    return args


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
        self.classnames = list(classnames)

    def prompts(self, classnames):
        if self.csc and list(classnames) != self.classnames:
            raise common.UserError("a class-specific context exists only for its training classes")
        return self.clip.prompts(classnames, self.n_ctx, self.position)

    def logits(self, image_feats, classnames=None):
        text = self.prompts(classnames or self.classnames)(self.ctx)   # g(t_i) for every class
        return common.cosine_logits(image_feats, text, self.clip.logit_scale)  # s * cos(f(x), g(t_i))


def coop_loss(model, image_feats, labels):
    return F.cross_entropy(model.logits(image_feats), labels)  # L = CE(p(y|x), y)


def zero_shot_predict(task):
    template = task.dataset.template
    cache = {}

    def predict(classnames, feats):
        key = tuple(classnames)
        if key not in cache:
            cache[key] = common.encode_texts(task.clip, [template.format(c.replace("_", " ")) for c in classnames])
        return common.cosine_logits(feats, cache[key], task.clip.logit_scale)
    return predict


def run(args, seed):
    method = "zsclip" if args.zero_shot else "coop"
    out = common.claim_run_dir(args, method, seed)
    task = common.prepare(args, seed)
    extra = {}
    if args.zero_shot:
        metrics = task.evaluate(zero_shot_predict(task))
        extra["template"] = task.dataset.template
    else:
        model = CoOp(task.clip, task.classnames, args.n_ctx, args.ctx_init, args.class_token_position, args.csc,
                     gen=common.generator(seed, "context init"))
        start, feature_s = time.perf_counter(), task.cache.seconds
        stats = common.fit([model.ctx], lambda feats, labels: coop_loss(model, feats, labels),
                           lambda epoch: (task.train_features(epoch), task.labels), n=len(task.train),
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, precision=task.clip.precision,
                           seed=seed, device=task.clip.device, desc=f"CoOp seed {seed}")
        # the augmented views encoded on the way are feature extraction, not training
        task.times["training_s"] = time.perf_counter() - start - (task.cache.seconds - feature_s)
        metrics = task.evaluate(lambda names, feats: model.logits(feats, names))
        words = common.nearest_words(task.clip, model.ctx.detach())
        if not args.csc:
            print("nearest words of each context vector:", " | ".join(" ".join(w for w, _ in ws) for ws in words))
        common.save_prompt(out, task, ctx=model.ctx, n_ctx=args.n_ctx, ctx_init=args.ctx_init,
                           position=args.class_token_position, csc=args.csc)
        extra = {"train": stats, "nearest_words": words}
    common.write_results(out, task, method, metrics, extra)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    common.main_seeds(args, "zsclip" if args.zero_shot else "coop", run)


if __name__ == "__main__":
    main()
