"""PromptSRC -- Self-regulating Prompts: Foundational Model Adaptation without Forgetting.
Khattak, Wasim, Naseer, Khan, Yang, Khan. ICCV 2023, arXiv 2307.06948. Official code: muzairkhattak/PromptSRC.

Independent deep prompts in both towers (IVLP), trained with the labels AND kept close to the frozen CLIP
(paper §3.2; the terms as the official forward_backward computes them):
    text:   [SOS] [P_0] [CLASS] . [EOT]; P_i replaces the n positions after SOS at blocks i < J_t  (P_0 from "a photo of a")
    vision: V_0 appended after the patch tokens (before ln_pre), V_i replacing it at blocks i < J_v  (VPT-deep)
    l      = s cos(f(x; V), g(t_i; P))                      the prompted logits
    l_zs   = s cos(f(x), mean_k g(template_k(class_i)))    the frozen CLIP: its 60 ImageNet templates, averaged
    L_SCL-image  = 10 * mean |f~(x; V) - f~(x)|             L1 between the normalised image features
    L_SCL-text   = 25 * mean |g~(t_i; P) - g~_zs(i)|        L1 between the normalised class text features
    L_SCL-logits = KL(p_zs || p) summed over classes and images, / (B * C)
    L = CE(l, y) + L_SCL-logits + L_SCL-text + L_SCL-image
    GPA: the evaluated prompts are sum_e w_e P^(e), w_e = N(e; mu, sigma^2) / sum_e' N(e'; mu, sigma^2), P^(e)
         the prompts after epoch e = 1..E (Gaussian prompt aggregation)
The paper's equation numbers could not be read here: the terms carry the paper's names. Faithful to the official
code: 4 + 4 tokens, P_0 from "a photo of a", the other prompts N(0, 0.02^2); the frozen text features are the raw
mean over the 60 templates (OpenAI's 80 ImageNet templates minus 20, as imagenet_templates.py lists them),
normalised once; the frozen image features are CLIP's own on the same augmented crop; SGD 0.0025 + one warm-up
epoch at 1e-5 + cosine, batch 4. Three official configs (--config; default from the protocol):
    base2new       J 9/9, GPA (15, 1), 20 epochs   vit_b16_c2_ep20_batch4_4+4ctx.yaml (base-to-new, the default)
    cross_dataset  J 3/3, GPA (6, 10), 20 epochs   ..._4+4ctx_cross_datasets.yaml (training on ImageNet, --eval-on)
    fewshot        J 9/9, GPA (30, 30), 50 epochs  ..._ep50_batch4_4+4ctx_few_shot.yaml (--protocol fewshot; its
                   commented-out (45, 5) for five datasets: --gpa-mean 45 --gpa-std 5)
Sources, pinned:
https://github.com/muzairkhattak/PromptSRC/blob/bb95c77b634d63488f2cad81ff4a72d53bdd06d5/trainers/promptsrc.py#L113-L128
    the frozen text features (60-template mean); L185-L211: the prompted and frozen features and logits
https://github.com/muzairkhattak/PromptSRC/blob/bb95c77b634d63488f2cad81ff4a72d53bdd06d5/trainers/promptsrc.py#L297-L335
    the loss (L_SCL terms and CE) and GPA (weights: L263-L270, get_gauss: L358-L360)
https://github.com/muzairkhattak/PromptSRC/blob/bb95c77b634d63488f2cad81ff4a72d53bdd06d5/configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml
    and the _cross_datasets and _ep50 ... _few_shot configs beside it
Different: the frozen image features come from the feature cache (the crop the prompted tower sees, encoded once)
instead of a second pass through an fp16 copy of the tower; GPA aggregates the prompts (the official code
weights the whole state dict, frozen CLIP included, whose weights sum back to themselves); fp32 master prompts
under autocast instead of the official fp16.

    python promptsrc.py --dataset eurosat                    # base-to-new, 16 shots, ViT-B/16
    python kdpl.py --dataset eurosat --student promptsrc     # PromptSRC + KDPL: the labels go, the rest stays
"""
import math

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

IMAGE_INPUT = "images"  # what logits() takes: pixels (the prompted tower), not cached features (kdpl.py)
# imagenet_templates.py's IMAGENET_TEMPLATES: OpenAI's 80 ImageNet templates without these 20
NOT_IN_PROMPTSRC = {"a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
                    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.",
                    "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
                    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
                    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
                    "a photo of a small {}.", "a tattoo of the {}."}
TEMPLATES = [t for t in (f("{}") for f in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
             if t not in NOT_IN_PROMPTSRC]
CONFIGS = {"base2new": dict(depth=9, gpa_mean=15.0, gpa_std=1.0, epochs=20),
           "cross_dataset": dict(depth=3, gpa_mean=6.0, gpa_std=10.0, epochs=20),
           "fewshot": dict(depth=9, gpa_mean=30.0, gpa_std=30.0, epochs=50)}
# KDPL's PromptSRC student: miccunifi/KDPL src/configs/trainers/PromptSRC_KDPL/vit_b32_c2_ep20_batch4_4+4ctx.yaml
# (and its _cross_datasets twin for --eval-on): the official configs with a ViT-B/32
KDPL_CONFIG = dict(backbone="ViT-B-32", batch_size=4, lr=0.0025)


def parse_args(argv=None):
    p = common.base_parser("PromptSRC: deep prompts in both towers, regulated by the frozen CLIP (ICCV 2023).",
                           protocol="base2new")  # scripts/promptsrc/base2new_train.sh
    p.set_defaults(batch_size=4, lr=0.0025)  # every PromptSRC config
    add_student_flags(p)
    args = p.parse_args(argv)
    fill_official(args)
    if min(args.n_ctx, args.depth, args.epochs) < 1 or args.gpa_std <= 0:
        p.error("--n-ctx, --depth, --epochs must be at least 1 and --gpa-std positive")
    return args


def add_student_flags(p):
    """PromptSRC's own hyper-parameters (also kdpl.py --student promptsrc's); None: the --config's value."""
    p.add_argument("--config", choices=list(CONFIGS), help="the official config whose depth, GPA and epochs to use "
                   "(default: cross_dataset with --eval-on, else the --protocol's)")
    p.add_argument("--n-ctx", type=int, default=4, help="prompt tokens per layer, both towers (N_CTX_TEXT/VISION)")
    p.add_argument("--depth", type=int, help="prompt depth J, both towers (PROMPT_DEPTH_TEXT/VISION)")
    p.add_argument("--ctx-init", default="a photo of a", help="words starting P_0 (\"\" = random)")
    p.add_argument("--text-loss-weight", type=float, default=25.0, help="weight of L_SCL-text")  # TEXT_LOSS_WEIGHT
    p.add_argument("--image-loss-weight", type=float, default=10.0, help="weight of L_SCL-image")  # IMAGE_LOSS_WEIGHT
    p.add_argument("--gpa-mean", type=float, help="GPA: mean epoch of the Gaussian (1-based)")
    p.add_argument("--gpa-std", type=float, help="GPA: its standard deviation, in epochs")


def fill_official(args):
    """The official config's depth, GPA and epochs where no flag set them."""
    args.config = args.config or ("cross_dataset" if args.eval_on else args.protocol)
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# --------------------------------------------------------------------------------------------------
# The method (paper §3.2): IVLP prompts, the frozen CLIP's targets, the self-regulating terms, GPA
# --------------------------------------------------------------------------------------------------
def frozen_text(clip, classnames):
    """g~_zs: the frozen text tower over the 60 templates, the raw features averaged (normalised later)."""
    names = [c.replace("_", " ") for c in classnames]
    feats = common.encode_texts(clip, [t.format(name) for t in TEMPLATES for name in names])
    return feats.view(len(TEMPLATES), len(names), -1).mean(0)


class PromptSRC(nn.Module):
    """IVLP: the text context P_0, deep text prompts P_1.., visual prompts V_0.. -- independent of each other."""

    def __init__(self, clip, classnames, n_ctx=4, depth=9, ctx_init="a photo of a", seed=1):
        super().__init__()
        layers = min(len(clip.text.transformer.resblocks), len(clip.model.visual.transformer.resblocks))
        if depth > layers:
            raise common.UserError(f"--depth {depth}: {clip.backbone}'s towers have {layers} layers; pass --depth "
                                   f"{layers} or less")
        try:
            ctx, self.words = common.context_from_words(clip, ctx_init, n_ctx, common.generator(seed, "context init"))
        except ValueError as err:
            raise common.UserError(f"--ctx-init {err}") from None
        gen, width = common.generator(seed, "deep prompts"), clip.model.visual.transformer.width
        self.clip, self.classnames = clip, list(classnames)
        self.ctx = nn.Parameter(ctx.to(clip.device))                                                     # P_0
        deep_text, visual = torch.randn(depth - 1, n_ctx, clip.ctx_dim, generator=gen), torch.randn(depth, n_ctx, width,
                                                                                                    generator=gen)
        self.deep_text = nn.Parameter((deep_text * 0.02).to(clip.device))                                # P_1 ..
        self.visual = nn.Parameter((visual * 0.02).to(clip.device))                                      # V_0 ..
        self.prompts = common.ClassPrompts(clip, classnames, n_ctx, words=self.words)
        self.frozen_text = frozen_text(clip, classnames)  # the training classes' (not a buffer: not a prompt)

    def class_prompts(self, classnames=None):
        if classnames is None or list(classnames) == self.classnames:
            return self.prompts
        return common.ClassPrompts(self.clip, classnames, len(self.ctx), words=self.words)

    def text_features(self, classnames=None, rows=None):
        """g(t_i; P) of the training classes (or `classnames`, or the selected `rows`)."""
        prompts = self.class_prompts(classnames)
        eot = prompts.eot if rows is None else prompts.eot[rows]
        return common.encode_text(self.clip, prompts.embed(self.ctx, rows), eot, deep=list(self.deep_text))

    def image_features(self, images):
        return common.encode_image(self.clip, images, list(self.visual))  # f(x; V)

    def logits(self, images, classnames=None, rows=None):
        return common.cosine_logits(self.image_features(images), self.text_features(classnames, rows),
                                    self.clip.logit_scale)

    def classifier(self, classnames):
        """For evaluation: the text side of a class list once, then images -> logits."""
        text = self.text_features(classnames)
        return lambda images: common.cosine_logits(self.image_features(images), text, self.clip.logit_scale)

    def trainable(self):
        return list(self.parameters())


def self_regulating_terms(model, images, frozen_image, text_weight, image_weight, rows=None):
    """(prompted logits l, {L_SCL-logits, L_SCL-text, L_SCL-image}) of a batch: images through the prompted
    towers, frozen_image the frozen CLIP's features of the same crops (the cache's), over the training classes
    or the selected rows (KDPL)."""
    image, text = model.image_features(images), model.text_features(rows=rows)
    frozen = model.frozen_text if rows is None else model.frozen_text[rows]
    logits = common.cosine_logits(image, text, model.clip.logit_scale)
    with torch.no_grad():
        zs_logits = common.cosine_logits(frozen_image, frozen, model.clip.logit_scale)        # l_zs
    norm = lambda x: F.normalize(x.float(), dim=-1)
    return logits, {  # promptsrc.py#L297-L313
        "logits": F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits, 1), reduction="sum",
                           log_target=True) / logits.numel(),                                 # L_SCL-logits
        "text": text_weight * F.l1_loss(norm(text), norm(frozen)),                            # L_SCL-text
        "image": image_weight * F.l1_loss(norm(image), norm(frozen_image))}                   # L_SCL-image


def promptsrc_loss(model, images, frozen_image, labels, text_weight=25.0, image_weight=10.0):
    logits, terms = self_regulating_terms(model, images, frozen_image, text_weight, image_weight)
    return F.cross_entropy(logits, labels) + sum(terms.values())                           # L = CE + L_SCL


def gpa_weights(mean, std, epochs):
    """w_e = N(e; mean, std^2) / sum_e' N(e'; mean, std^2) for epochs e = 1..E (get_gauss, then normalised); in
    log space, so that a mean far from 1..E (a short --epochs run) cannot underflow every weight to 0."""
    log_pdf = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]  # 1/(std sqrt(2 pi)) cancels out
    pdf = [math.exp(x - max(log_pdf)) for x in log_pdf]
    return [p / sum(pdf) for p in pdf]


class GaussianPromptAggregation:
    """GPA: call after each epoch (common.fit's epoch_end); load() gives the model sum_e w_e P^(e)."""

    def __init__(self, model, mean, std, epochs):
        self.model, self.weights = model, gpa_weights(mean, std, epochs)
        self.sum = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}

    def __call__(self, epoch):  # 0-based: the prompts after epoch `epoch + 1`, weighted w_{epoch + 1}
        for key, value in self.model.state_dict().items():
            self.sum[key] += self.weights[epoch] * value.detach()

    def load(self):
        self.model.load_state_dict(self.sum)


def kdpl_student(clip, names, args, seed):
    """The student KDPL trains (kdpl.py --student promptsrc); KDPL keeps self_regulating_terms and GPA."""
    fill_official(args)
    return PromptSRC(clip, names, args.n_ctx, args.depth, args.ctx_init, seed)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, the training and evaluation run, results
# --------------------------------------------------------------------------------------------------
def saved_model(exp, saved):
    model = PromptSRC(exp.clip, exp.classnames, saved["n_ctx"], len(saved["visual"]), saved["ctx_init"], exp.seed)
    model.load_state_dict({key: saved[key] for key in model.state_dict()})
    return model


def run(args, seed):
    out = common.claim_run_dir(args, "promptsrc", seed)
    exp = common.prepare(args, seed)
    common.require_prompted_vit(exp.clip, "PromptSRC")
    saved = exp.load_prompt("promptsrc")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        model = PromptSRC(exp.clip, exp.classnames, args.n_ctx, args.depth, args.ctx_init, seed)
        gpa = GaussianPromptAggregation(model, args.gpa_mean, args.gpa_std, args.epochs)
        # the prompted tower sees the decoded crop of the epoch's view; the frozen CLIP's feature of it is cached
        epoch_data = lambda epoch: (exp.train_images(epoch), exp.train_features(epoch), exp.labels)
        loss = lambda x, frozen, y: promptsrc_loss(model, x, frozen, y, args.text_loss_weight, args.image_loss_weight)
        extra = {"train": exp.fit(model.trainable(), loss, epoch_data, desc="PromptSRC", epoch_end=gpa),
                 "gpa_weights": gpa.weights}
        gpa.load()  # the evaluated prompts: the Gaussian-weighted aggregate over epochs
    metrics = exp.evaluate(model.classifier, images=True)
    extra["nearest_words"] = common.nearest_words(exp.clip, model.ctx.detach())
    if not saved:
        learned = model.state_dict()
        common.save_prompt(out, exp, "promptsrc", learned.pop("ctx"), **learned, ctx_init=args.ctx_init)
    common.write_results(out, exp, "promptsrc", metrics, dict(extra, official_config=args.config))
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "promptsrc", run)


if __name__ == "__main__":
    main()
