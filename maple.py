"""MaPLe -- Multi-modal Prompt Learning.
Khattak, Rasheed, Maaz, Khan, Khan. CVPR 2023, arXiv 2210.03117. Official code: muzairkhattak/multimodal-prompt-learning.

Learned prompts in both towers, the visual ones coupled to the text ones (paper §3.2; as the official code
computes them): with J the prompt depth, n the prompt length,
    text:   [SOS] [P_0] of a [CLASS] . [EOT]     P_0: n learned tokens (from "a photo of a": "a photo"; "of a" frozen)
            at block i = 1..J-1 the n positions after SOS are REPLACED by the learned P_i; beyond J they flow on
    vision: V_i = F_i(P_i), i = 0..J-1            F_i: Linear(text width -> vision width), the V-L coupling
            V_0 appended after the patch tokens (before ln_pre), V_i replacing it at block i (as VPT-deep)
    p(y=i|x) = softmax_i(s cos(f(x; V), g(t_i; P)))        L = cross-entropy(p(y|x), y)
Trained: P_0..P_{J-1} and F_0..F_{J-1}; CLIP is frozen. Faithful to the official code: n = 2 tokens of "a photo
of a", P_1.. N(0, 0.02^2), F_0 and the clones F_1.. = one Linear's default init copied (identical starts),
J = 9, SGD 0.0035 + one warm-up epoch at 1e-5 + cosine, 5 epochs, batch 4, ViT-B/16, base-to-new with 16 shots;
training on ImageNet for cross-dataset / domain generalisation (--eval-on) takes the cross-dataset config: J = 3,
lr 0.0026, 2 epochs. Sources:
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/trainers/maple.py#L70-L176
    MultiModalPromptLearner: the init (L84-L117) and the couplings (L159-L176)
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/clip/model.py#L259-L331
    ResidualAttentionBlock_MaPLe: the deep prompts replaced at the input of blocks 1..J-1, both towers
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
    and vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml (J = 3, lr 0.0026, 2 epochs)
Different: the coupling widths come from the model (the official code hard-codes 512 -> 768 and breaks on ViT-L,
its issue #46); fp32 master prompts and couplings under autocast (the official code runs them in fp16). The
image tower runs every step on the epoch's augmented view of each image (decoded per step).

    python maple.py --dataset eurosat                    # base-to-new, 16 shots, ViT-B/16
    python kdpl.py --dataset eurosat --student maple     # MaPLe + KDPL (no labels)
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

IMAGE_INPUT = "images"  # what logits() takes: pixels (the prompted tower), not cached features (kdpl.py)
CROSS_DATASET = dict(depth=3, lr=0.0026, epochs=2)  # vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml
# KDPL's MaPLe student: miccunifi/KDPL src/configs/trainers/MaPLe_KDPL/vit_b32_c2_ep5_batch4_2ctx.yaml (also for
# its cross-domain runs: KDPL has no cross-dataset MaPLe config)
KDPL_CONFIG = dict(backbone="ViT-B-32", epochs=5, batch_size=4, lr=0.0035, n_ctx=2, depth=9, ctx_init="a photo of a")


def parse_args(argv=None):
    p = common.base_parser("MaPLe: coupled prompts in both of CLIP's towers (CVPR 2023).", protocol="base2new")
    p.set_defaults(epochs=None, batch_size=4, lr=None)  # resolved below: base-to-new or cross-dataset config
    add_student_flags(p)
    p.set_defaults(depth=None)
    args = p.parse_args(argv)
    official = CROSS_DATASET if args.eval_on else dict(depth=9, lr=0.0035, epochs=5)  # vit_b16_c2_ep5_batch4_2ctx
    for key, value in official.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.n_ctx, args.depth, args.epochs) < 1:
        p.error("--n-ctx, --depth and --epochs must be at least 1")
    return args


def add_student_flags(p):
    """MaPLe's own hyper-parameters (also kdpl.py --student maple's)."""
    p.add_argument("--n-ctx", type=int, default=2, help="prompt tokens n (from the first n of --ctx-init)")  # N_CTX
    p.add_argument("--depth", type=int, default=9, help="prompt depth J: layers with their own prompts, both towers")
    p.add_argument("--ctx-init", default="a photo of a",
                   help="the template: its first n tokens start P_0, the rest stay frozen words; \"\" = random")


# --------------------------------------------------------------------------------------------------
# The method (paper §3.2): the text prompts, the V-L couplings, both prompted towers, the loss
# --------------------------------------------------------------------------------------------------
class MaPLe(nn.Module):
    """P_0 (the text context), the deep text prompts P_1..P_{J-1}, and the couplings F_0..F_{J-1}."""

    def __init__(self, clip, classnames, n_ctx=2, depth=9, ctx_init="a photo of a", seed=1):
        super().__init__()
        text_width, vision_width = clip.ctx_dim, clip.model.visual.transformer.width
        layers = min(len(clip.text.transformer.resblocks), len(clip.model.visual.transformer.resblocks))
        if depth > layers:
            raise common.UserError(f"--depth {depth}: {clip.backbone}'s towers have {layers} layers; pass --depth {layers} "
                                   f"or less")
        try:  # official: the first n tokens of the template start P_0, its other words stay frozen
            ctx, frozen = common.context_from_words(clip, ctx_init, n_ctx, common.generator(seed, "context init"))
        except ValueError as err:
            raise common.UserError(f"--ctx-init {err}") from None
        self.clip, self.classnames, self.words = clip, list(classnames), frozen
        self.ctx = nn.Parameter(ctx.to(clip.device))                                   # P_0
        deep = torch.randn(depth - 1, n_ctx, text_width, generator=common.generator(seed, "deep text prompts"))
        self.deep_text = nn.Parameter((deep * 0.02).to(clip.device))                    # P_1 .. P_{J-1}
        with common.global_rng(seed, "couplings"):  # nn.Linear's default init draws from the global generator
            self.proj, coupling = nn.Linear(text_width, vision_width), nn.Linear(text_width, vision_width)
        self.deep_proj = nn.ModuleList(copy.deepcopy(coupling) for _ in range(depth - 1))  # _get_clones: identical
        self.to(clip.device)
        self.prompts = common.ClassPrompts(clip, classnames, n_ctx, words=frozen)       # t_i of the training classes

    def class_prompts(self, classnames=None):
        if classnames is None or list(classnames) == self.classnames:
            return self.prompts
        return common.ClassPrompts(self.clip, classnames, len(self.ctx), words=self.words)

    def text_features(self, classnames=None, rows=None):
        """g(t_i; P): the text tower with P_0 in the prompts and P_1.. replaced at blocks 1.. (all or `rows`)."""
        prompts = self.class_prompts(classnames)
        eot = prompts.eot if rows is None else prompts.eot[rows]
        return common.encode_text(self.clip, prompts.embed(self.ctx, rows), eot, deep=list(self.deep_text))

    def visual_prompts(self):
        """V_i = F_i(P_i): the coupling of every layer's text prompts into the image tower's width."""
        return [self.proj(self.ctx)] + [f(p) for f, p in zip(self.deep_proj, self.deep_text)]

    def logits(self, images, classnames=None, rows=None):
        """s cos(f(x; V), g(t_i; P)) (B, C) over the training classes (or `classnames`, or the selected `rows`)."""
        image = common.encode_image(self.clip, images, self.visual_prompts())
        return common.cosine_logits(image, self.text_features(classnames, rows), self.clip.logit_scale)

    def classifier(self, classnames):
        """For evaluation: the text side of a class list once, then images -> logits."""
        text, visual = self.text_features(classnames), self.visual_prompts()
        return lambda images: common.cosine_logits(common.encode_image(self.clip, images, visual), text,
                                                   self.clip.logit_scale)

    def trainable(self):
        return list(self.parameters())


def maple_loss(model, images, labels):
    return F.cross_entropy(model.logits(images), labels)  # L = CE(p(y|x), y)


def kdpl_student(clip, names, args, seed):
    """The student KDPL trains (kdpl.py --student maple)."""
    return MaPLe(clip, names, args.n_ctx, args.depth, args.ctx_init, seed)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, the training and evaluation run, results
# --------------------------------------------------------------------------------------------------
def saved_model(exp, saved):
    model = MaPLe(exp.clip, exp.classnames, saved["n_ctx"], len(saved["deep_text"]) + 1, saved["ctx_init"], exp.seed)
    model.load_state_dict({key: saved[key] for key in model.state_dict()})
    return model


def run(args, seed):
    out = common.claim_run_dir(args, "maple", seed)
    exp = common.prepare(args, seed)
    common.require_prompted_vit(exp.clip, "MaPLe")
    saved = exp.load_prompt("maple")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        model = MaPLe(exp.clip, exp.classnames, args.n_ctx, args.depth, args.ctx_init, seed)
        epoch_data = lambda epoch: (exp.train_images(epoch), exp.labels)  # the prompted tower sees pixels
        extra = {"train": exp.fit(model.trainable(), lambda x, y: maple_loss(model, x, y), epoch_data, desc="MaPLe")}
    metrics = exp.evaluate(model.classifier, images=True)
    extra["nearest_words"] = common.nearest_words(exp.clip, model.ctx.detach())
    if not saved:
        learned = model.state_dict()
        common.save_prompt(out, exp, "maple", learned.pop("ctx"), **learned, ctx_init=args.ctx_init)
    common.write_results(out, exp, "maple", metrics, dict(extra, depth=len(model.deep_text) + 1, words=model.words))
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "maple", run)


if __name__ == "__main__":
    main()
