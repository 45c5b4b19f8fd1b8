"""KDPL -- Improving Zero-shot Generalization of Learned Prompts via Unsupervised Knowledge Distillation.
Mistretta, Baldrati, Bertini, Bagdanov. ECCV 2024, arXiv 2407.03056. Official code: miccunifi/KDPL.

CoOp's prompt learner on a small CLIP (the student) is trained WITHOUT LABELS: a larger frozen CLIP
(the teacher) classifies each training image zero-shot, and the student matches its distribution.
    l_T = s * cos(f_T(x), g_T("template(class)"))      teacher logits, with the STUDENT's logit scale s
    l_S = s * cos(f_S(x), g_S([V]_1..[V]_M [CLASS] .))  student logits (only V trains)
    K   = top-K classes of mean_b softmax(l_T)            per batch ("sampling" in kdpl_utils.py)
    L   = 1/2 KL(p_T || p_S) + 1/2 KL(p_S || p_T)        p = softmax over the K selected classes
The paper's equations were not read (methods.md §3, papers.md §4): the loss and the selection follow the
official code, src/trainers/coop_kdpl.py forward_backward and kdpl_utils.py sampling.
Faithful: student = CoOp with 4 context tokens from "a photo of a", class token at the end, shared context;
teacher = open_clip ViT-H-14-quickgelu / dfn5b, zero-shot with CoOp's dataset template (or "a photo of a {}."
in class-agnostic mode), text features computed once; alpha = beta = 0.5, batch mean; K = number of classes,
or K_max = 1000 from a dictionary (KDPL-CA); SGD 0.002, warm-up + cosine, 50 epochs, batch 32, 16 shots.
Different: the teacher sees the student's augmented crops through the shared feature cache (same crop per
(image, view) for both towers, each encoded once, never per step); AMP instead of fp16; the teacher logits,
selection and KL run in fp32. KDPL-CA's dictionary is the official ~20k-name CSV when passed with --dictionary;
the offline default is WordNet's ~119k nouns, which differs from the paper's (reconstructed choice).
Protocols here: few-shot and base-to-new (new-class accuracy is the paper's "base-to-unseen"); the paper's
cross-dataset / domain-generalisation protocols (ImageNet -> others) are not wired up in common.prepare.

    python kdpl.py --dataset eurosat                      # ViT-B/32 student, ViT-H/14 DFN5B teacher, 16 shots
    python kdpl.py --dataset eurosat --protocol base2new
    python kdpl.py --dataset eurosat --class-agnostic [--dictionary classnames_dictionay.csv]
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

CA_TEMPLATE = "a photo of a {}."  # kdpl_utils.TeacherPrompt: class-agnostic teacher template


def parse_args(argv=None):
    p = common.base_parser("KDPL: label-free prompt learning by distillation from a larger CLIP (ECCV 2024).")
    p.set_defaults(backbone="ViT-B-32",  # configs/trainers/CoOp_KDPL/vit_b32_ctxv1.yaml (also rn50_ctxv1)
                   epochs=50)            # OPTIM.MAX_EPOCH 50 in every CoOp+KDPL config
    p.add_argument("--teacher", default="ViT-H-14-quickgelu",  # cfg.TRAINER.KDPL.TEACHER default
                   help="open_clip architecture of the frozen teacher (tiny-wide for smoke runs)")
    p.add_argument("--teacher-pretrained", default="dfn5b",  # kdpl_utils.load_teacher_to_cpu
                   help="teacher weights: open_clip tag, checkpoint file, or none")
    p.add_argument("--ctx-init", default="a photo of a",  # CTX_INIT in *_ctxv1.yaml (N_CTX 4)
                   help="words initialising the student's shared context (M = their token count)")
    p.add_argument("--class-agnostic", action="store_true",
                   help="KDPL-CA: use no training class names; the teacher picks names from --dictionary")
    p.add_argument("--dictionary", help="names for --class-agnostic: KDPL's CSV (ClassName column) or one name "
                                        "per line; default: WordNet nouns (~119k, unlike KDPL's ~20k CSV)")
    p.add_argument("--k-max", type=int, default=1000,  # cfg.TRAINER.KDPL.K_MAX
                   help="class-agnostic: names selected per batch")
    args = p.parse_args(argv)
    if not args.ctx_init.strip():
        p.error("--ctx-init must hold at least one word (KDPL initialises the context from words)")
    if args.epochs < 1 or args.k_max < 1:
        p.error("--epochs and --k-max must be at least 1")
    if args.dictionary and not args.class_agnostic:
        p.error("--dictionary is used only with --class-agnostic; add --class-agnostic or drop --dictionary")
    return args


class Student(nn.Module):
    """CoOp's learnable shared context V over the training names (class names, or the KDPL-CA dictionary)."""

    def __init__(self, clip, train_names, ctx_init):
        super().__init__()
        self.clip = clip
        self.ctx = nn.Parameter(common.words_to_embeddings(clip, ctx_init))  # CoOp ctx_init
        self.train_prompts = clip.prompts(train_names, self.ctx.shape[0])  # token ids only: 100k names fit

    def text_features(self, rows=None):
        return self.train_prompts(self.ctx, rows)

    def logits(self, image_feats, classnames):
        """Inference: the student alone, over all test classes (CoOp_KDPL.model_inference)."""
        text = self.clip.prompts(classnames, self.ctx.shape[0])(self.ctx)
        return common.cosine_logits(image_feats, text, self.clip.logit_scale)


def teacher_text_features(teacher, names, template, precision):
    """Frozen teacher text features of hand-crafted prompts, computed once (init_teacher_text_features)."""
    with common.autocast(teacher.device, teacher.precision):
        return common.encode_texts(teacher, [template.format(n.replace("_", " ")) for n in names])


# --------------------------------------------------------------------------------------------------
# Loss (official: coop_kdpl.py CoOp_KDPL.forward_backward, kdpl_utils.sampling)
# --------------------------------------------------------------------------------------------------
def select_classes(teacher_logits, k):
    """The K classes with the largest batch-mean teacher probability: p_bar = 1/B sum_b softmax(l_T)_b."""
    p_bar = teacher_logits.float().softmax(dim=-1).mean(dim=0)
    return p_bar.topk(k).indices  # argpartition in the official code: same set, order irrelevant to L


def symmetric_kl(student_logits, teacher_logits, alpha=0.5, beta=0.5):
    """L = alpha KL(p_T || p_S) + beta KL(p_S || p_T), batch mean; alpha = beta = 0.5 hard-coded officially."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # L_F = KL(p_T || p_S)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")  # L_R = KL(p_S || p_T)
    return alpha * forward + beta * reverse


def kdpl_loss(student, teacher_text, student_feats, teacher_feats, k):
    """One batch: no labels. Teacher logits use the student's logit scale (CustomCLIPTeacher)."""
    scale = student.clip.logit_scale
    with torch.no_grad(), torch.autocast(teacher_feats.device.type, enabled=False):
        teacher_logits = common.cosine_logits(teacher_feats.float(), teacher_text.float(), scale)
        rows = select_classes(teacher_logits, k)
    student_logits = common.cosine_logits(student_feats, student.text_features(rows), scale)
    return symmetric_kl(student_logits, teacher_logits[:, rows])


def train(task, student, teacher, teacher_text, k, args, seed):
    """CoOp's loop over the training set; each row is (student view feature, teacher feature of the SAME view)."""
    spent = {"student": 0.0, "teacher": 0.0}

    def epoch_data(epoch):  # labels never enter: task.labels is not read anywhere in training
        before = task.cache.seconds
        feats_s = task.train_features(epoch)
        middle = task.cache.seconds
        feats_t = task.train_features(epoch, clip=teacher)  # same cached crops, encoded once per tower
        spent["student"] += middle - before
        spent["teacher"] += task.cache.seconds - middle
        return feats_s, feats_t

    start, feature_s = time.perf_counter(), task.cache.seconds
    stats = common.fit([student.ctx], lambda fs, ft: kdpl_loss(student, teacher_text, fs, ft, k), epoch_data,
                       n=len(task.train), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       precision=task.clip.precision, seed=seed, device=task.clip.device, desc=f"KDPL seed {seed}")
    task.times["training_s"] = time.perf_counter() - start - (task.cache.seconds - feature_s)
    return stats, spent


def teacher_zero_shot(task, teacher):
    """The teacher's zero-shot accuracy with the dataset template, on the student's evaluation sets."""
    metrics = {}
    for which, ev in task.evals.items():
        feats = task.cache.get(teacher, ev.dataset, ev.items, "test")
        text = teacher_text_features(teacher, ev.classnames, data.TEMPLATES[ev.dataset], task.args.precision)
        logits = common.cosine_logits(feats, text, task.clip.logit_scale)
        metrics["accuracy" if which == "all" else which] = common.accuracy(logits, ev.labels)
    if "base" in metrics:
        metrics["H"] = common.harmonic_mean(metrics["base"], metrics["new"])
    return metrics


def method_name(args):
    return "kdpl_ca" if args.class_agnostic else "kdpl"  # results in runs/kdpl/... or runs/kdpl_ca/...


def run(args, seed):
    method = method_name(args)
    out = common.claim_run_dir(args, method, seed)
    if args.class_agnostic:  # KDPL-CA: the training class names are never used, only the dictionary
        names = data.read_names(args.dictionary) if args.dictionary else data.wordnet_nouns()
        template, k = CA_TEMPLATE, args.k_max
        if k > len(names):
            raise common.UserError(f"--k-max {k} exceeds the {len(names)} names of the dictionary; pass "
                                   f"--k-max {len(names)} or a larger --dictionary")
    task = common.prepare(args, seed)
    student_s = task.cache.seconds
    teacher = common.load_clip(args.teacher, args.teacher_pretrained, task.clip.device)
    if not args.class_agnostic:
        names, template, k = task.classnames, task.dataset.template, len(task.classnames)  # K = all classes
    start = time.perf_counter()
    teacher_text = teacher_text_features(teacher, names, template, args.precision)
    student = Student(task.clip, names, args.ctx_init)
    task.times["text_setup_s"] = time.perf_counter() - start

    stats, spent = train(task, student, teacher, teacher_text, k, args, seed)
    metrics = task.evaluate(lambda classnames, feats: student.logits(feats, classnames))
    if "new" in metrics:
        metrics["base_to_unseen"] = metrics["new"]  # the paper's name for new-class accuracy
    before = task.cache.seconds
    teacher_metrics = teacher_zero_shot(task, teacher)
    print(f"teacher {teacher.backbone} ({teacher.weights}) zero-shot: " +
          ", ".join(f"{key} {v:.2f}" for key, v in teacher_metrics.items()))
    task.times["student_feature_extraction_s"] = student_s + spent["student"]
    task.times["teacher_feature_extraction_s"] = spent["teacher"] + task.cache.seconds - before

    words = common.nearest_words(task.clip, student.ctx.detach())
    print("nearest words of each context vector:", " | ".join(" ".join(w for w, _ in ws) for ws in words))
    common.save_prompt(out, task, ctx=student.ctx, ctx_init=args.ctx_init, position="end")
    extra = {"train": stats, "nearest_words": words, "k": k, "class_agnostic": args.class_agnostic,
             "teacher": {"backbone": teacher.backbone, "weights": teacher.weights, "train_template": template,
                         "eval_template": task.dataset.template, "zero_shot": teacher_metrics},
             "dictionary": {"source": args.dictionary or "wordnet", "size": len(names)} if args.class_agnostic
             else None}
    common.write_results(out, task, method, metrics, extra)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    common.main_seeds(args, method_name(args), run)


if __name__ == "__main__":
    main()
