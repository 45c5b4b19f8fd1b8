"""KDPL -- Improving Zero-shot Generalization of Learned Prompts via Unsupervised Knowledge Distillation.
Mistretta, Baldrati, Bertini, Bagdanov. ECCV 2024, arXiv 2407.03056. Official code: github.com/miccunifi/KDPL.

Any prompt learner on a small CLIP (the student) is trained WITHOUT LABELS: a larger frozen CLIP (the teacher)
classifies each training image zero-shot, and the student matches its distribution. KDPL replaces the
student's cross-entropy by this distillation and keeps everything else of the student (prompts, recipe).
    l_T = s * cos(f_T(x), g_T("template(class)"))      teacher logits, with the STUDENT's logit scale s
    l_S = the student's logits (CoOp: s * cos(f_S(x), g_S([V]_1..[V]_M [CLASS] .)); CoCoOp, VPT, MaPLe, PromptSRC: theirs)
    K   = top-K classes of mean_b softmax(l_T)            per batch
    L   = 1/2 KL(p_T || p_S) + 1/2 KL(p_S || p_T)        p = softmax over the K selected classes
The paper's equations were not readable to us: the loss and the selection follow the official code, pinned:
https://github.com/miccunifi/KDPL/blob/76da8da2bad8a5c0842dfc25f901f1d69ad2aabd/src/trainers/coop_kdpl.py#L107-L125
    forward_backward: teacher logits, selection, L_F = KL(p_T || p_S), L_R = KL(p_S || p_T), 0.5 / 0.5
https://github.com/miccunifi/KDPL/blob/76da8da2bad8a5c0842dfc25f901f1d69ad2aabd/src/trainers/cocoop_kdpl.py#L130-L159
    the same loss on CoCoOp's conditional prompts (each student's *_kdpl.py swaps the cross-entropy for it)
https://github.com/miccunifi/KDPL/blob/76da8da2bad8a5c0842dfc25f901f1d69ad2aabd/src/trainers/kdpl_utils.py#L93-L164
    teacher with the student's logit scale (L104), top-K of the batch-mean softmax (L148-L155), K (L158-L164)
Students (--student, each a method file of its own that this file imports):
  * coop (default): 4 context tokens from "a photo of a", class token at the end, shared context; ViT-B/32,
    50 epochs, batch 32 (src/configs/trainers/CoOp_KDPL/vit_b32_ctxv1.yaml);
  * cocoop: CoOp's context + the Meta-Net; ViT-B/32, 10 epochs, batch 1 (CoCoOp_KDPL/vit_b32_c4_ep10_batch1_ctxv1.yaml);
  * vpt: deep visual prompts, 8 tokens in 12 layers; ViT-B/32, 5 epochs, batch 4, lr 0.0025 (VPT_KDPL/...);
  * maple: coupled prompts, 2 tokens, depth 9; ViT-B/32, 5 epochs, batch 4, lr 0.0035 (MaPLe_KDPL/...);
  * promptsrc: IVLP prompts, 4 + 4 tokens, depth 9 (3 with --eval-on), 20 epochs, batch 4, lr 0.0025, ViT-B/32
    (PromptSRC_KDPL/...): the labels go, PromptSRC's self-regulating terms and prompt aggregation STAY
    (promptsrc_kdpl.py#L143-L201), see kdpl_promptsrc_loss and train.
What a student file offers, and all KDPL uses of it: KDPL_CONFIG (its official KDPL settings), add_student_flags(p)
(its own hyper-parameters), IMAGE_INPUT ("features": cached image features; "images": a prompted image tower,
which sees the same crop as the teacher), kdpl_student(clip, names, args, seed) -> its prompt module, whose
logits(input, classnames=None, rows=None) are the student's logits (rows: the K selected training names), whose
trainable() lists what trains and, for "images", whose classifier(classnames) evaluates; the module's state_dict
is what prompt.pt keeps.
Faithful: teacher = open_clip ViT-H-14-quickgelu / dfn5b, zero-shot with CoOp's dataset template (or "a photo
of a {}." in class-agnostic mode), text features computed once; K = number of classes, or K_max = 1000 names of
a dictionary (KDPL-CA, the paper's §3.3); SGD, warm-up + cosine, 16 shots, seeds 1-3 (scripts below).
Protocols, as the official scripts run them (same commit, src/scripts/<student>_kdpl/):
  * base-to-new, the DEFAULT here: reproduce_base2new_train.sh trains on the base classes, the paper reports
    the new-class accuracy ("base-to-unseen", results.json's base_to_unseen);
  * cross-dataset / domain generalisation: reproduce_cross_d_train.sh trains on all ImageNet classes, 16 shots,
    then tests the prompt on other datasets: here --eval-on, which makes fewshot (all classes) the default.
Different: the teacher sees the student's augmented crops through the shared feature cache (same crop per
(image, view) for both towers, each encoded once, never per step). Precision: the official code runs the
student in fp16 (COOP.PREC) and the teacher in fp32 end to end; here the student trains under autocast with
fp32 weights (--precision: bf16 on CUDA) and the teacher encodes images and texts in fp32 (--teacher-precision
fp32, its features cached under their own key), so its soft targets are the official ones; the teacher logits,
selection and KL run in fp32. Added: the teacher's own zero-shot accuracy on the evaluation sets, when they
are small (--teacher-eval); --kl forward|reverse, the paper's ablation of the divergence. KDPL-CA's dictionary
is the official ~20k-name CSV when passed with --dictionary; the offline default is WordNet's ~118k nouns,
which differs from the paper's (reconstructed choice).

    python kdpl.py --dataset eurosat                      # base-to-new, CoOp student (ViT-B/32), ViT-H/14 teacher
    python kdpl.py --dataset eurosat --student cocoop     # CoCoOp + KDPL
    python kdpl.py --dataset imagenet --eval-on imagenetv2 imagenet_sketch imagenet_a imagenet_r   # DG, 16 shots
    python kdpl.py --dataset eurosat --class-agnostic [--dictionary classnames_dictionay.csv]
    python kdpl.py --dataset eurosat --protocol fewshot   # all classes: a protocol the paper does not report
"""
import time

import torch
import torch.nn.functional as F

import cocoop
import common
import coop
import data
import maple
import promptsrc
import vpt

STUDENTS = {"coop": coop, "cocoop": cocoop, "vpt": vpt, "maple": maple, "promptsrc": promptsrc}  # --student: the method file of each (its interface: docstring)
# --kl: weights (alpha, beta) of L_F = KL(p_T || p_S) and L_R = KL(p_S || p_T); symmetric is KDPL's (0.5 / 0.5
# hard-coded officially), forward and reverse are the divergences the paper's ablation compares it with
KL_WEIGHTS = {"symmetric": (0.5, 0.5), "forward": (1.0, 0.0), "reverse": (0.0, 1.0)}

CA_TEMPLATE = "a photo of a {}."  # kdpl_utils.py#L68-L69: class-agnostic teacher template
# --teacher-eval auto: the teacher's zero-shot pass runs when the evaluation sets hold at most this many images.
# 20k covers the test split of every CoOp dataset but Food101 (30k) and ImageNet (50k): for domain generalisation
# (ImageNet + V2/Sketch/A/R, ~150k images) the ViT-H pass would cost far more than the training itself.
TEACHER_EVAL_MAX_IMAGES = 20_000


def parse_args(argv=None):
    p = common.base_parser(
        "KDPL: label-free prompt learning by distillation from a larger CLIP (ECCV 2024).", protocol=None,
        protocol_help="base2new (default): train on the base half of the classes, test on base and new; the paper "
        "reports the new-class accuracy (scripts/coop_kdpl/reproduce_base2new_*.sh). fewshot: all classes, the "
        "default when --eval-on is given (cross-dataset / domain generalisation train on all ImageNet classes, "
        "reproduce_cross_d_train.sh); on its own a protocol the paper does not report")
    p.add_argument("--student", default="coop", choices=list(STUDENTS),
                   help="the prompt learner KDPL trains; its official KDPL config sets the defaults of --backbone, "
                        "--epochs, --batch-size, --lr and --ctx-init (see each file's KDPL_CONFIG)")
    p.add_argument("--kl", default="symmetric", choices=list(KL_WEIGHTS),
                   help="the divergence: symmetric = 1/2 KL(p_T||p_S) + 1/2 KL(p_S||p_T) (KDPL's); forward = "
                        "KL(p_T||p_S); reverse = KL(p_S||p_T) (the paper's ablation)")
    p.add_argument("--teacher", default="ViT-H-14-quickgelu",  # cfg.TRAINER.KDPL.TEACHER default
                   help="open_clip architecture of the frozen teacher (tiny-wide for smoke runs)")
    p.add_argument("--teacher-pretrained", default="dfn5b",  # kdpl_utils.load_teacher_to_cpu
                   help="teacher weights: open_clip tag, checkpoint file, or none")
    p.add_argument("--teacher-precision", default="fp32", choices=["fp32", "bf16", "fp16"],  # as the official teacher
                   help="autocast of the teacher's image and text encoding (the official teacher runs in fp32)")
    p.add_argument("--class-agnostic", action="store_true",
                   help="KDPL-CA: use no training class names; the teacher picks names from --dictionary")
    p.add_argument("--dictionary", help="names for --class-agnostic: KDPL's CSV (ClassName column) or one name "
                                        "per line; default: WordNet nouns (~118k, unlike KDPL's ~20k CSV)")
    p.add_argument("--k-max", type=int, default=1000,  # cfg.TRAINER.KDPL.K_MAX
                   help="class-agnostic: names selected per batch")
    p.add_argument("--teacher-eval", default="auto", choices=["auto", "on", "off"],
                   help="also report the teacher's zero-shot accuracy on the evaluation sets (not in the official "
                        f"code; costs one teacher pass over them): auto = only when they hold at most "
                        f"{TEACHER_EVAL_MAX_IMAGES:,} images (not for domain generalisation); results.json records "
                        f"whether it ran and why not")
    student = STUDENTS[p.parse_known_args(argv)[0].student]
    student.add_student_flags(p)           # the student's own hyper-parameters (--ctx-init, --n-ctx, --depth ...)
    p.set_defaults(**student.KDPL_CONFIG)  # its official KDPL config; flags given override it
    args = p.parse_args(argv)
    if args.protocol is None:  # the official scripts: base-to-new, or all ImageNet classes for --eval-on
        args.protocol = "fewshot" if args.eval_on else "base2new"
    if args.student == "promptsrc":  # its depth, GPA and epochs: the official config of the protocol (KDPL's too)
        promptsrc.fill_official(args)
    if not getattr(args, "ctx_init", "-").strip():
        p.error("--ctx-init must hold at least one word (KDPL initialises the context from words)")
    if args.epochs < 1 or args.k_max < 1:
        p.error("--epochs and --k-max must be at least 1")
    if args.dictionary and not args.class_agnostic:
        p.error("--dictionary is used only with --class-agnostic; add --class-agnostic or drop --dictionary")
    return args


# --------------------------------------------------------------------------------------------------
# The method: the student, the teacher's targets, the loss (official: coop_kdpl.py CoOp_KDPL.forward_backward,
# kdpl_utils.sampling)
# --------------------------------------------------------------------------------------------------
def teacher_text_features(teacher, names, template):
    """Frozen teacher text features of hand-crafted prompts, computed once (init_teacher_text_features),
    in the teacher's own precision."""
    with common.autocast(teacher.device, teacher.precision):
        return common.encode_texts(teacher, [template.format(n.replace("_", " ")) for n in names])


def select_classes(teacher_logits, k):
    """The K classes with the largest batch-mean teacher probability: p_bar = 1/B sum_b softmax(l_T)_b."""
    p_bar = teacher_logits.float().softmax(dim=-1).mean(dim=0)
    return p_bar.topk(k).indices  # argpartition in the official code: same set, order irrelevant to L


def symmetric_kl(student_logits, teacher_logits, alpha=0.5, beta=0.5):
    """L = alpha KL(p_T || p_S) + beta KL(p_S || p_T), batch mean; alpha = beta = 0.5 hard-coded officially
    (KL_WEIGHTS: the paper's ablation trains with one direction alone)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # L_F = KL(p_T || p_S)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")  # L_R = KL(p_S || p_T)
    return alpha * forward + beta * reverse


def teacher_targets(scale, teacher_text, teacher_feats, k):
    """Teacher logits with the STUDENT's logit scale (kdpl_utils.py#L104, #L124) and the K classes they select."""
    with torch.no_grad(), torch.autocast(teacher_feats.device.type, enabled=False):
        teacher_logits = common.cosine_logits(teacher_feats.float(), teacher_text.float(), scale)
        return teacher_logits, select_classes(teacher_logits, k)  # coop_kdpl.py#L111


def kdpl_loss(student, teacher_text, student_input, teacher_feats, k, kl="symmetric"):
    """One batch, no labels: the teacher's logits and the K classes they select, the student's logits over those K
    prompts only, and the symmetric KL. student_input: what the student's logits take (cached image features,
    or the images of a prompted image tower)."""
    teacher_logits, rows = teacher_targets(student.clip.logit_scale, teacher_text, teacher_feats, k)
    student_logits = student.logits(student_input, rows=rows)  # #L113: the K selected prompts only
    return symmetric_kl(student_logits, teacher_logits[:, rows], *KL_WEIGHTS[kl])  # #L114-L123


def kdpl_promptsrc_loss(student, teacher_text, images, frozen_image, teacher_feats, k, kl, text_weight, image_weight):
    """KDPL on PromptSRC (promptsrc_kdpl.py#L143-L173): the symmetric KL takes the cross-entropy's place, and
    PromptSRC's self-regulating terms STAY, towards the student's own frozen CLIP (not the teacher)."""
    teacher_logits, rows = teacher_targets(student.clip.logit_scale, teacher_text, teacher_feats, k)
    student_logits, terms = promptsrc.self_regulating_terms(student, images, frozen_image, text_weight, image_weight,
                                                            rows)
    return symmetric_kl(student_logits, teacher_logits[:, rows], *KL_WEIGHTS[kl]) + sum(terms.values())


# --------------------------------------------------------------------------------------------------
# Run plumbing: the training loop's data, the teacher's own accuracy, the run, results
# --------------------------------------------------------------------------------------------------
def train(exp, student, teacher, teacher_text, k, kl, images=False):
    """CoOp's loop over the training set; each row is (the student's input, teacher feature of the SAME view):
    the student's cached feature, or, for a prompted image tower (images=True), the image itself in that view,
    the very crop the teacher's feature was computed from. Labels never enter: exp.labels is not read here.
    A PromptSRC student keeps its own regularisation: its self-regulating terms (with the frozen CLIP's cached
    feature of the same crop) and its Gaussian prompt aggregation over the epochs."""
    if isinstance(student, promptsrc.PromptSRC):
        args = exp.args
        gpa = promptsrc.GaussianPromptAggregation(student, args.gpa_mean, args.gpa_std, args.epochs)
        epoch_data = lambda epoch: (exp.train_images(epoch), exp.train_features(epoch),
                                    exp.train_features(epoch, clip=teacher))
        stats = exp.fit(student.trainable(), lambda x, frozen, t: kdpl_promptsrc_loss(
            student, teacher_text, x, frozen, t, k, kl, args.text_loss_weight, args.image_loss_weight), epoch_data,
            desc="KDPL", epoch_end=gpa)
        gpa.load()  # the evaluated prompts: PromptSRC's Gaussian-weighted aggregate
        return dict(stats, gpa_weights=gpa.weights)

    def epoch_data(epoch):  # the same crops; a frozen tower encodes each once, into the cache
        student_input = exp.train_images(epoch) if images else exp.train_features(epoch)
        return student_input, exp.train_features(epoch, clip=teacher)
    return exp.fit(student.trainable(), lambda s, t: kdpl_loss(student, teacher_text, s, t, k, kl), epoch_data,
                   desc="KDPL")


def teacher_eval_decision(exp, mode):
    """(run, note) for --teacher-eval: the teacher's zero-shot pass over the evaluation sets, or why not."""
    images = sum(len(ev.items) for ev in exp.evals.values())
    if mode == "off":
        return False, f"skipped: --teacher-eval off ({images} evaluation images)"
    if mode == "auto" and images > TEACHER_EVAL_MAX_IMAGES:
        return False, (f"skipped: {images} evaluation images exceed {TEACHER_EVAL_MAX_IMAGES} "
                       f"(--teacher-eval auto); pass --teacher-eval on to run it")
    return True, f"ran on {images} evaluation images (--teacher-eval {mode})"


def teacher_zero_shot(exp, teacher):
    """The teacher's zero-shot accuracy with each evaluation set's dataset template, on the student's sets."""
    templates = {tuple(ev.classnames): data.TEMPLATES[ev.dataset] for ev in exp.evals.values()}

    def predict(classnames, feats):
        text = teacher_text_features(teacher, classnames, templates[tuple(classnames)])
        return common.cosine_logits(feats, text, exp.clip.logit_scale)
    return exp.evaluate(predict, clip=teacher, time_as="teacher_evaluation_s")


def prompt_name(args):
    """The method a prompt.pt names: kdpl (the CoOp student), kdpl_<student> for the others."""
    return "kdpl" if args.student == "coop" else f"kdpl_{args.student}"


def method_name(args):
    """Where results go: runs/kdpl[_ca]/... for the CoOp student, runs/kdpl[_ca]_<student>/... for the others."""
    return "kdpl" + ("_ca" if args.class_agnostic else "") + ("" if args.student == "coop" else f"_{args.student}")


def run(args, seed):
    method = method_name(args)
    out = common.claim_run_dir(args, method, seed)
    if args.class_agnostic:  # KDPL-CA: the training class names are never used, only the dictionary
        names = data.read_names(args.dictionary) if args.dictionary else data.wordnet_nouns()
        template, k = CA_TEMPLATE, args.k_max
        if k > len(names):
            raise common.UserError(f"--k-max {k} exceeds the {len(names)} names of the dictionary; pass "
                                   f"--k-max {len(names)} or a larger --dictionary")
    exp = common.prepare(args, seed)
    module = STUDENTS[args.student]
    images = module.IMAGE_INPUT == "images"  # the student's logits take images (a prompted image tower)
    if images:
        common.require_prompted_vit(exp.clip, args.student)
    saved = exp.load_prompt(prompt_name(args))
    if saved:  # evaluate the saved student: no teacher needed
        student, teacher = module.kdpl_student(exp.clip, exp.classnames, args, seed), None
        student.load_state_dict({key: saved[key] for key in student.state_dict()})
        extra = {"loaded_from": args.load_prompt}
    else:
        teacher = common.load_clip(args.teacher, args.teacher_pretrained, exp.clip.device, args.teacher_precision)
        if not args.class_agnostic:
            names, template, k = exp.classnames, exp.dataset.template, len(exp.classnames)  # K = all classes
        start = time.perf_counter()
        teacher_text = teacher_text_features(teacher, names, template)
        student = module.kdpl_student(exp.clip, names, args, seed)
        exp.times["text_setup_s"] = time.perf_counter() - start
        extra = {"train": train(exp, student, teacher, teacher_text, k, args.kl, images), "k": k}
    if images:  # a prompted image tower classifies test images, one class list's text side at a time
        metrics = exp.evaluate(student.classifier, images=True)
    else:
        metrics = exp.evaluate(lambda classnames, feats: student.logits(feats, classnames))
    if "new" in metrics:
        metrics["base_to_unseen"] = metrics["new"]  # the paper's name for new-class accuracy
    if teacher is not None:
        ran, note = teacher_eval_decision(exp, args.teacher_eval)
        teacher_metrics = teacher_zero_shot(exp, teacher) if ran else None
        print(f"teacher {teacher.backbone} ({teacher.weights}) zero-shot: " + (", ".join(
            f"{key} {v:.2f}" for key, v in teacher_metrics.items()) if ran else note))
        extra["teacher"] = {"backbone": teacher.backbone, "weights": teacher.weights, "precision": teacher.precision,
                            "activation": {"name": teacher.activation, "chosen_by": teacher.activation_source},
                            "train_template": template, "eval_template": exp.dataset.template,
                            "zero_shot": teacher_metrics,
                            "zero_shot_eval": {"ran": ran, "mode": args.teacher_eval, "note": note}}
    words = common.nearest_words(exp.clip, student.ctx.detach()) if hasattr(student, "ctx") else None
    if words:  # a text context (VPT has none)
        print("nearest words of each context vector:", " | ".join(" ".join(w for w, _ in ws) for ws in words))
    config = {key: getattr(args, key) for key in module.KDPL_CONFIG}
    if not saved:
        learned = student.state_dict()  # what trains: the context, CoCoOp's Meta-Net, VPT's prompts ...
        common.save_prompt(out, exp, prompt_name(args), learned.pop("ctx", None), **learned, student=args.student,
                           student_kdpl_config=config)
    extra.update({"student": args.student, "kl": args.kl, "student_kdpl_config": config,
                  "nearest_words": words, "class_agnostic": args.class_agnostic,
                  "dictionary": {"source": args.dictionary or "wordnet", "size": len(names)} if args.class_agnostic
                  else None})
    common.write_results(out, exp, method, metrics, extra)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    common.main_seeds(args, method_name(args), run)


if __name__ == "__main__":
    main()
