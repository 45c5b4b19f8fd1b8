"""VPT -- Visual Prompt Tuning (deep), as a prompt learner for CLIP.
Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim. ECCV 2022, arXiv 2203.12119. For CLIP, as implemented by the
official multimodal-prompt-learning code (Khattak et al., the VPT baseline of MaPLe; KDPL's VPT student), pinned.

Learned tokens inside CLIP's image tower; the text side is CLIP's frozen "a photo of a {class}." (paper §3.2,
VPT-Deep): with P_i the n prompt tokens of layer i + 1 (i = 0..J-1) and E the patch tokens,
    z_0    = ln_pre([CLS, E_0] + positions, P_0)          P_0 appended after the patches, no positional embedding
    z_i    = L_i([CLS_{i-1}, E_{i-1}, P_{i-1}])            i < J: layer i's own prompts REPLACE the previous outputs
    z_i    = L_i(z_{i-1})                                  i >= J: the prompt tokens flow on
    f(x)   = proj(ln_post(CLS_N))                          the prompts are dropped at the output
    p(y=i|x) = softmax_i(s cos(f(x), g("a photo of a {class_i}.")))     L = cross-entropy(p(y|x), y)
Only the prompts train (J x n x width); CLIP is frozen. Faithful to the official config: n = 8 tokens in all
J = 12 layers, N(0, 0.02^2) init, SGD 0.0025 + one warm-up epoch at 1e-5 + cosine, 5 epochs, batch 4, ViT-B/16,
base-to-new with 16 shots. Sources:
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/trainers/vpt.py#L67-L114
    FixedEmbeddings ("a photo of a {}." through the frozen text tower, once) and CustomCLIP.forward
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/clip/model.py#L362-L422
    the prompted ViT (common.encode_image follows it) and its blocks (L191-L256, VPT_shallow replaced per block)
https://github.com/muzairkhattak/multimodal-prompt-learning/blob/69bce21ae8eda80ad6187534b2dce09cf6c59e17/configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml
    N_CTX_VISION 8, PROMPT_DEPTH_VISION 12, lr 0.0025, 5 epochs, batch 4 (the "_4" of the file name is stale)
Different: fp32 master prompts under autocast (the official code rounds the prompts to fp16 in an fp32 model);
the prompts sit after the patch tokens as in the official CLIP code (the VPT paper puts them before: the same
model, since prompts carry no positional embedding). The image tower runs every step on the epoch's augmented
view of each image (decoded per step), the same crop a cached frozen tower would see.

    python vpt.py --dataset eurosat                      # base-to-new, 16 shots, ViT-B/16
    python kdpl.py --dataset eurosat --student vpt       # VPT + KDPL (no labels)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

TEMPLATE = "a photo of a {}."  # FixedEmbeddings: the same template for every dataset
IMAGE_INPUT = "images"         # what logits() takes: pixels (the prompted tower), not cached features (kdpl.py)
# KDPL's VPT student: miccunifi/KDPL src/configs/trainers/VPT_KDPL/vit_b32_c2_ep5_batch4_4.yaml
KDPL_CONFIG = dict(backbone="ViT-B-32", epochs=5, batch_size=4, lr=0.0025, n_ctx=8, depth=12)


def parse_args(argv=None):
    p = common.base_parser("VPT-deep: learned tokens in every layer of CLIP's image tower (ECCV 2022).",
                           protocol="base2new")  # scripts/vpt/base2new_train_vpt.sh
    p.set_defaults(epochs=5, batch_size=4, lr=0.0025)  # configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml
    add_student_flags(p)
    args = p.parse_args(argv)
    if min(args.n_ctx, args.depth, args.epochs) < 1:
        p.error("--n-ctx, --depth and --epochs must be at least 1")
    return args


def add_student_flags(p):
    """VPT's own hyper-parameters (also kdpl.py --student vpt's)."""
    p.add_argument("--n-ctx", type=int, default=8, help="visual prompt tokens n per layer")  # N_CTX_VISION
    p.add_argument("--depth", type=int, default=12, help="layers with their own prompts J (1 = VPT-shallow)")


# --------------------------------------------------------------------------------------------------
# The method (VPT-Deep in CLIP's image tower): the prompts, the prompted features, the loss
# --------------------------------------------------------------------------------------------------
class VPT(nn.Module):
    """J x n learned tokens of the image tower's width, and the frozen text features of the training classes."""

    def __init__(self, clip, classnames, n_ctx=8, depth=12, seed=1):
        super().__init__()
        layers, width = len(clip.model.visual.transformer.resblocks), clip.model.visual.transformer.width
        if depth > layers:
            raise common.UserError(f"--depth {depth}: the image tower of {clip.backbone} has {layers} layers; pass "
                                   f"--depth {layers} or less")
        self.clip, self.classnames = clip, list(classnames)
        init = torch.randn(depth, n_ctx, width, generator=common.generator(seed, "visual prompts")) * 0.02
        self.prompts = nn.Parameter(init.to(clip.device))  # P_0 .. P_{J-1}: nn.init.normal_(std=0.02)
        self.text = fixed_text(clip, classnames)  # the training classes' (not a buffer: prompt.pt keeps the prompts)

    def text_features(self, classnames):
        return self.text if list(classnames) == self.classnames else fixed_text(self.clip, classnames)

    def image_features(self, images):
        return common.encode_image(self.clip, images, list(self.prompts))  # f(x) with P_0 .. P_{J-1}

    def logits(self, images, classnames=None, rows=None):
        """s cos(f(x), g(t_i)) (B, C) over the training classes (or `classnames`, or the selected `rows`)."""
        text = self.text if classnames is None else self.text_features(classnames)
        return common.cosine_logits(self.image_features(images), text if rows is None else text[rows],
                                    self.clip.logit_scale)

    def classifier(self, classnames):
        """For evaluation: the text side of a class list once, then images -> logits."""
        text = self.text_features(classnames)
        return lambda images: common.cosine_logits(self.image_features(images), text, self.clip.logit_scale)

    def trainable(self):
        return [self.prompts]


def fixed_text(clip, classnames):
    """g("a photo of a {class}.") from the frozen text tower, once per class list (FixedEmbeddings)."""
    return common.encode_texts(clip, [TEMPLATE.format(c.replace("_", " ")) for c in classnames])


def vpt_loss(model, images, labels):
    return F.cross_entropy(model.logits(images), labels)  # L = CE(p(y|x), y)


def kdpl_student(clip, names, args, seed):
    """The student KDPL trains (kdpl.py --student vpt)."""
    return VPT(clip, names, args.n_ctx, args.depth, seed)


# --------------------------------------------------------------------------------------------------
# Run plumbing: a saved prompt, the training and evaluation run, results
# --------------------------------------------------------------------------------------------------
def saved_model(exp, saved):
    depth, n_ctx, _ = saved["prompts"].shape
    model = VPT(exp.clip, exp.classnames, n_ctx, depth, exp.seed)
    model.load_state_dict({"prompts": saved["prompts"]})
    return model


def run(args, seed):
    out = common.claim_run_dir(args, "vpt", seed)
    exp = common.prepare(args, seed)
    common.require_prompted_vit(exp.clip, "VPT")
    saved = exp.load_prompt("vpt")
    if saved:
        model, extra = saved_model(exp, saved), {"loaded_from": args.load_prompt}
    else:
        model = VPT(exp.clip, exp.classnames, args.n_ctx, args.depth, seed)
        epoch_data = lambda epoch: (exp.train_images(epoch), exp.labels)  # the prompted tower sees pixels
        extra = {"train": exp.fit(model.trainable(), lambda x, y: vpt_loss(model, x, y), epoch_data, desc="VPT")}
    metrics = exp.evaluate(model.classifier, images=True)
    if not saved:
        common.save_prompt(out, exp, "vpt", None, **model.state_dict(), template=TEMPLATE)  # the J x n prompts
    common.write_results(out, exp, "vpt", metrics, dict(extra, depth=len(model.prompts), n_ctx=model.prompts.shape[1],
                                                          template=TEMPLATE))
    return metrics


def main(argv=None):
    common.main_seeds(parse_args(argv), "vpt", run)


if __name__ == "__main__":
    main()
