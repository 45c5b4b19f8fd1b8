"""Datasets for CLIP prompt learning, exactly as the CoOp/Dassl code base prepares them.

What this file reproduces; sources, pinned:
  https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/DATASETS.md  (layouts)
  https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/datasets/oxford_pets.py#L123-L170  (read_split, subsample_classes)
  https://github.com/KaiyangZhou/Dassl.pytorch/blob/c61a1b570ac6333bd50fb5ae06aea59002fb20bb/dassl/data/datasets/base_dataset.py#L167-L210  (generate_fewshot_dataset)
  https://github.com/KaiyangZhou/CoOp/blob/ff61507c790454bce7c5052c3ac39e60772f1f89/trainers/zsclip.py#L13-L28  (CUSTOM_TEMPLATES)
- CoOp's folder layout under one data root, e.g. `<root>/eurosat/2750/...` next to
  `<root>/eurosat/split_zhou_EuroSAT.json`. The split file *is* the ground truth for train/val/test,
  labels and class names (`{"train"|"val"|"test": [[path relative to the image dir, label, name]]}`).
  CoOp generates a split when the file is absent; we never do: a different split means different
  numbers, so a missing split file is downloaded from CoOp's Google Drive or reported.
- FGVCAircraft uses the official `images_variant_{train,val,test}.txt` (no JSON); ImageNet and its
  four variants are read from wnid folders (val = test = the official val set; variants test-only).
- Few-shot subsets (`fewshot_split`): Dassl's `generate_fewshot_dataset` after `random.seed(seed)`:
  per label, in order of first appearance, `random.sample(items, k)` (all items if fewer), train
  with k shots first, then val with min(k, 4) shots, from the same RNG stream.
- Base/new classes (`subsample_classes`): Dassl's `subsample_classes`: sorted labels, the first
  ceil(n/2) are base, the rest new, relabelled from 0. Applied after few-shot sampling.
- Templates: CoOp's `CUSTOM_TEMPLATES` (trainers/zsclip.py).
Every user-facing problem (unknown name, missing folder, split file or image) raises `DataError`
with one message saying what is missing, where it must go and how to get it.
"""
from __future__ import annotations

import json
import math
import os
import random
import urllib.request
from dataclasses import dataclass, replace


class DataError(Exception):
    """A dataset problem the user must fix; the message says how."""


@dataclass(frozen=True)
class Item:
    path: str        # absolute image path
    rel: str         # path relative to the data root (recorded in results.json)
    label: int
    classname: str   # CoOp's class name; prompts replace "_" by " " later


@dataclass
class Dataset:
    name: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]   # label-ordered
    template: str           # CoOp's hand-crafted template, "{}" = class name


@dataclass(frozen=True)
class Source:
    """Where one dataset lives under the data root and how to get it."""
    folder: str              # CoOp's dataset folder under the data root
    images: str              # image dir inside `folder`; split-file paths are relative to it
    template: str            # CoOp CUSTOM_TEMPLATES
    split: str = ""          # split_zhou_<split>.json ("" = no JSON split)
    split_id: str = ""       # Google Drive id of that file (CoOp DATASETS.md)
    tv: tuple[str, str, str] | None = None  # (torchvision class, dir it extracts, CoOp dir to link)
    get: str = ""            # how to get the images by hand


DATASETS: dict[str, Source] = {
    "imagenet": Source(folder="imagenet", images="images", template="a photo of a {}.", get=(
        "download ImageNet-1k from https://image-net.org and put train/ and val/ in this folder, each "
        "with 1000 wnid folders (n01440764, ...; sort val into wnid folders). Optional: CoOp's "
        "classnames.txt (https://drive.google.com/file/d/1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF/view) "
        "in <root>/imagenet/.")),
    "caltech101": Source(folder="caltech-101", images="101_ObjectCategories", template="a photo of a {}.",
                         split="Caltech101",
                         split_id="1hyarUivQE36mY6jSomru6Fjd-JzwcCzN",
                         tv=("Caltech101", "caltech101/101_ObjectCategories", "caltech-101/101_ObjectCategories"),
                         get="extract 101_ObjectCategories.tar.gz from "
                         "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip here."),
    "oxford_pets": Source(folder="oxford_pets", images="images", template="a photo of a {}, a type of pet.",
                          split="OxfordPets",
                          split_id="1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs",
                          tv=("OxfordIIITPet", "oxford-iiit-pet/images", "oxford_pets/images"),
                          get="extract https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz here."),
    "stanford_cars": Source(folder="stanford_cars", images="", template="a photo of a {}.", split="StanfordCars",
                            split_id="1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT", tv=None,
                            get="the Stanford URLs are dead: get the images from Kaggle "
                            "(https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset), "
                            "flatten them to cars_train/*.jpg and cars_test/*.jpg in this folder, and "
                            "extract the devkit (https://github.com/pytorch/vision/files/11644847/car_devkit.tgz) "
                            "as devkit/ next to them."),
    "oxford_flowers": Source(folder="oxford_flowers", images="jpg", template="a photo of a {}, a type of flower.",
                             split="OxfordFlowers",
                             split_id="1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT",
                             tv=("Flowers102", "flowers-102/jpg", "oxford_flowers/jpg"),
                             get="extract https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz "
                             "into <root>/oxford_flowers/ (it creates jpg/)."),
    "food101": Source(folder="food-101", images="images", template="a photo of {}, a type of food.",
                      split="Food101",
                      split_id="1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
                      tv=("Food101", "food-101/images", "food-101/images"),
                      get="extract food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ "
                      "into <root>/."),
    "fgvc_aircraft": Source(folder="fgvc_aircraft", images="images", template="a photo of a {}, a type of aircraft.",
                            tv=("FGVCAircraft", "fgvc-aircraft-2013b/data", "fgvc_aircraft"),
                            get="extract https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                                "fgvc-aircraft-2013b.tar.gz and rename its data/ folder to <root>/fgvc_aircraft/ "
                                "(images/, variants.txt, images_variant_{train,val,test}.txt)."),
    "sun397": Source(folder="sun397", images="SUN397", template="a photo of a {}.",
                     split="SUN397", split_id="1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq",
                     get="extract http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz into "
                         "<root>/sun397/ (it creates SUN397/; if that URL is dead see torchvision issue #9348)."),
    "dtd": Source(folder="dtd", images="images", template="{} texture.",
                  split="DescribableTextures", split_id="1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x",
                  tv=("DTD", "dtd/dtd/images", "dtd/images"),
                  get="extract https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz into <root>/."),
    "eurosat": Source(folder="eurosat", images="2750", template="a centered satellite photo of {}.",
                      split="EuroSAT",
                      split_id="1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", tv=("EuroSAT", "eurosat/2750", "eurosat/2750"),
                      get="extract the RGB EuroSAT.zip (https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                      "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip) into <root>/eurosat/ (creates 2750/)."),
    "ucf101": Source(folder="ucf101", images="UCF-101-midframes", template="a photo of a person doing {}.",
                     split="UCF101",
                     split_id="1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y",
                     get="extract CoOp's UCF-101-midframes.zip (https://drive.google.com/file/d/"
                         "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view) into <root>/ucf101/."),
    "imagenetv2": Source(folder="imagenetv2", images="imagenetv2-matched-frequency-format-val",
                         template="a photo of a {}.", get=(
        "extract https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz "
        "into <root>/imagenetv2/ (folders 0..999).")),
    "imagenet_sketch": Source(folder="imagenet-sketch", images="images", template="a photo of a {}.", get=(
        "get ImageNet-Sketch from https://github.com/HaohanWang/ImageNet-Sketch and put its 1000 wnid "
        "folders in <root>/imagenet-sketch/images/.")),
    "imagenet_a": Source(folder="imagenet-adversarial", images="imagenet-a", template="a photo of a {}.", get=(
        "extract imagenet-a.tar from https://github.com/hendrycks/natural-adv-examples into "
        "<root>/imagenet-adversarial/.")),
    "imagenet_r": Source(folder="imagenet-rendition", images="imagenet-r", template="a photo of a {}.", get=(
        "extract imagenet-r.tar from https://github.com/hendrycks/imagenet-r into "
        "<root>/imagenet-rendition/.")),
}
TEMPLATES: dict[str, str] = {key: src.template for key, src in DATASETS.items()}

# Names people type, after lower-casing and dropping "-", "_" and spaces. Canonical keys and
# Dassl class names ("OxfordPets", "FGVCAircraft", "ImageNetA", ...) already match that way.
_ALIASES = {"flowers102": "oxford_flowers", "flowers": "oxford_flowers", "oxfordiiitpet": "oxford_pets",
            "pets": "oxford_pets", "cars": "stanford_cars", "aircraft": "fgvc_aircraft",
            "describabletextures": "dtd", "imagenetadversarial": "imagenet_a", "imagenetrendition": "imagenet_r"}


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def canonical_name(name: str) -> str:
    """The DATASETS key for what a user typed ("EuroSAT", "food-101", "imagenet-a", ...)."""
    keys = {_squash(k): k for k in DATASETS}
    key = keys.get(_squash(name)) or _ALIASES.get(_squash(name))
    if key is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


def _missing(key: str, root: str, problem: str, offer_download: bool = True) -> str:
    """One message: what is missing, the layout CoOp expects, and every way to provide it."""
    src = DATASETS[key]
    lines = [problem, f"{key} must be laid out as in CoOp's DATASETS.md: images under "
                      f"{os.path.join(root, src.folder, src.images)}"]
    if src.split:
        lines.append(f"split file {os.path.join(root, src.folder, f'split_zhou_{src.split}.json')} "
                     f"(from {_drive(src.split_id)})")
    if src.tv and offer_download:
        lines.append("torchvision can download the images for you: run without --no-download")
    lines += [f"by hand: {src.get.replace('<root>', root)}",
              f"or pass --data-root DIR where DIR/{src.folder}/ already exists"]
    return "\n  ".join(lines)


# ---------------------------------------------------------------------------------------- split files

def read_split(split_file: str, image_dir: str, data_root: str) -> tuple[list[Item], list[Item], list[Item]]:
    """Read a CoOp split_zhou_*.json into (train, val, test) Items; paths are relative to image_dir."""
    try:
        with open(split_file) as f:
            split = json.load(f)
        _check_split(split)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read split file {split_file}: {e}; delete it and fetch it again") from e
    prefix = os.path.relpath(image_dir, data_root)
    return tuple([Item(os.path.join(image_dir, p), os.path.join(prefix, p), int(y), c) for p, y, c in split[s]]
                 for s in ("train", "val", "test"))


def _check_split(split) -> None:
    if not (isinstance(split, dict) and all(isinstance(split.get(s), list) for s in ("train", "val", "test"))):
        raise ValueError("not a CoOp split file (needs train/val/test lists)")


def _split_file(key: str, root: str, download: bool) -> str:
    """The dataset folder's split file, else <root>/coop_splits/'s, else fetch it from CoOp's Drive."""
    src = DATASETS[key]
    name = f"split_zhou_{src.split}.json"
    target = os.path.join(root, src.folder, name)
    for path in (target, os.path.join(root, "coop_splits", name)):
        if os.path.isfile(path):
            return path
    by_hand = f"download it from {_drive(src.split_id)} and save it as {target}"
    if not download:
        raise DataError(f"split file {name} not found in {os.path.dirname(target)}/ or "
                        f"{os.path.join(root, 'coop_splits')}/: {by_hand}")
    url = f"https://drive.google.com/uc?export=download&id={src.split_id}"
    print(f"downloading {name} from CoOp's Google Drive ...")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            raw = response.read()
        _check_split(json.loads(raw))  # Drive may answer with an HTML warning or quota page
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors, bad JSON a ValueError
        raise DataError(f"could not download {name} (offline?): {e}. Instead {by_hand}") from e
    import common  # here, as common imports this module: its atomic write is the one every file goes through
    common.write_atomic(target, lambda tmp: tmp.write_bytes(raw))  # a full disk: one message, no partial file
    return target


# -------------------------------------------------------------------------------------------- images

def _download_images(key: str, root: str) -> None:
    """Let torchvision fetch the images, then link its folder to where CoOp expects it."""
    import torchvision.datasets

    cls, made, wanted = DATASETS[key].tv
    print(f"downloading {key} with torchvision.datasets.{cls} into {root} ...")
    try:
        getattr(torchvision.datasets, cls)(root, download=True)
    except ImportError:
        pass  # Flowers102 needs scipy only to parse its labels after the download; we use CoOp's split
    except Exception as e:  # urllib, checksum and archive errors all mean the same to the user
        raise DataError(_missing(key, root, f"could not download {key} (offline?): {e}", False)) from e
    made, wanted = os.path.join(root, made), os.path.join(root, wanted)
    if made != wanted and not os.path.lexists(wanted):
        os.makedirs(os.path.dirname(wanted), exist_ok=True)
        os.symlink(os.path.relpath(made, os.path.dirname(wanted)), wanted)  # a link, never a copy


def _read_fgvc(root: str) -> tuple[list[Item], list[Item], list[Item], list[str]]:
    """FGVCAircraft: official variant split; label = line index in variants.txt (as CoOp)."""
    folder = os.path.join(root, "fgvc_aircraft")
    with open(os.path.join(folder, "variants.txt")) as f:
        names = [line.strip() for line in f if line.strip()]
    label = {name: i for i, name in enumerate(names)}
    splits = []
    for s in ("train", "val", "test"):
        with open(os.path.join(folder, f"images_variant_{s}.txt")) as f:
            pairs = [line.strip().split(" ", 1) for line in f if line.strip()]  # "<id> <variant name>"
        splits.append([Item(os.path.join(folder, "images", f"{i}.jpg"), f"fgvc_aircraft/images/{i}.jpg",
                            label[c], c) for i, c in pairs])
    return (*splits, names)


def _imagenet_names(root: str) -> dict[str, str]:
    """wnid -> CLIP class name: CoOp's classnames.txt ("wnid name" lines) if present, else built in."""
    path = os.path.join(root, "imagenet", "classnames.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return dict(line.strip().split(" ", 1) for line in f if line.strip())
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # CLIP's names, sorted-wnid order
    from timm.data import ImageNetInfo  # timm is an open_clip dependency and ships the sorted wnids
    return dict(zip(ImageNetInfo().label_names(), IMAGENET_CLASSNAMES))


def _folder_items(root: str, rel_dir: str, folders: list[str], names: dict[str, str]) -> list[Item]:
    """One Item per file in rel_dir/<folder>/, label = index of the folder in `folders`."""
    items = []
    for label, folder in enumerate(folders):
        d = os.path.join(rel_dir, folder)
        for f in sorted(os.listdir(os.path.join(root, d))):  # sorted: CoOp's unsorted listdir is not portable
            if not f.startswith("."):
                items.append(Item(os.path.join(root, d, f), os.path.join(d, f), label, names[folder]))
    return items


def _read_imagenet(key: str, root: str) -> tuple[list[Item], list[Item], list[Item], list[str]]:
    """ImageNet (train; val = test = official val) and its test-only variants, from wnid folders."""
    src = DATASETS[key]
    rel = os.path.join(src.folder, src.images)
    names = _imagenet_names(root)

    def subdirs(d):  # class folders only (imagenet-a/r also hold a README.txt)
        return sorted(e.name for e in os.scandir(os.path.join(root, d)) if e.is_dir())
    if key == "imagenet":
        for sub in ("train", "val"):
            if not os.path.isdir(os.path.join(root, rel, sub)):
                raise DataError(_missing(key, root, f"{os.path.join(root, rel, sub)} does not exist."))
        wnids = subdirs(os.path.join(rel, "train"))  # label = index of the wnid among sorted folders
        test = _folder_items(root, os.path.join(rel, "val"), wnids, names)
        return _folder_items(root, os.path.join(rel, "train"), wnids, names), test, test, [names[w] for w in wnids]
    if key == "imagenetv2":  # folders are named by ImageNet label 0..999
        by_label = {str(i): names[w] for i, w in enumerate(sorted(names))}
        folders = [str(i) for i in range(len(by_label))]
        return [], [], _folder_items(root, rel, folders, by_label), [by_label[f] for f in folders]
    wnids = subdirs(rel)  # Sketch: all 1000; A and R: 200, label = rank among the present wnids
    return [], [], _folder_items(root, rel, wnids, names), [names[w] for w in wnids]


# ------------------------------------------------------------------------------------------- loading

def load_dataset(name: str, data_root: str, download: bool = True) -> Dataset:
    """Load a dataset in CoOp's layout under data_root, fetching what can be fetched if `download`."""
    key = canonical_name(name)
    src = DATASETS[key]
    root = os.path.abspath(os.path.expanduser(data_root))
    if not os.path.isdir(root):
        if not (download and src.tv):
            raise DataError(f"data root {root} does not exist: create it, or pass --data-root DIR "
                            f"pointing at the folder that holds {src.folder}/")
        os.makedirs(root)  # a new user's first run: torchvision fills it below
    image_dir = os.path.join(root, src.folder, src.images)
    if not os.path.isdir(image_dir) and not (download and src.tv):
        raise DataError(_missing(key, root, f"{image_dir} does not exist."))
    split_file = _split_file(key, root, download) if src.split else None  # small: fetch it first
    if not os.path.isdir(image_dir):
        _download_images(key, root)
    try:
        if key == "fgvc_aircraft":
            train, val, test, classnames = _read_fgvc(root)
        elif key.startswith("imagenet"):
            train, val, test, classnames = _read_imagenet(key, root)
        else:
            train, val, test = read_split(split_file, image_dir, root)
            first = {}  # label -> name, from the split file's train list (as CoOp's lab2cname)
            for item in train or test:
                first.setdefault(item.label, item.classname)
            classnames = [first[y] for y in sorted(first)]
    except OSError as e:  # a missing list file or class folder
        raise DataError(_missing(key, root, f"cannot read {e.filename or e}.")) from e
    except KeyError as e:  # a folder or variant that is not in the class list
        raise DataError(_missing(key, root, f"unknown class {e} in {image_dir}.")) from e
    for item in train[:3] + test[:3]:  # cheap sanity check; stat-ing every file would be slow
        if not os.path.isfile(item.path):
            raise DataError(_missing(key, root, f"image {item.path} is missing."))
    return Dataset(key, train, val, test, classnames, src.template)


# ------------------------------------------------------------------------------ few-shot and base/new

def sample_fewshot(items: list[Item], k: int, rng: random.Random | None = None) -> list[Item]:
    """Dassl's generate_fewshot_dataset: k items per label (all if fewer), labels in order of
    first appearance. rng=None uses the global `random`, exactly as Dassl; k < 1 keeps all."""
    if k < 1:
        return list(items)
    rng = rng or random
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    out = []
    for group in by_label.values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def fewshot_split(ds: Dataset, k: int, seed: int) -> tuple[list[Item], list[Item]]:
    """CoOp's few-shot (train, val): k shots then min(k, 4) shots from one RNG seeded with `seed`.
    Random(seed) gives the same stream as Dassl's random.seed(seed) + global random calls.
    (CoOp samples no val for ImageNet, whose val is the test set; its train subset is the same.)"""
    rng = random.Random(seed)
    train = sample_fewshot(ds.train, k, rng)  # order matters: train is drawn before val
    return train, sample_fewshot(ds.val, min(k, 4), rng)


def subsample_classes(ds: Dataset, which: str, *splits: list[Item]) -> tuple[list[str], list[list[Item]]]:
    """Dassl's subsample_classes: labels of the FIRST list sorted, base = first ceil(n/2), new = the
    rest; every list is filtered and relabelled 0.. . Returns (subset class names, lists)."""
    if which not in ("all", "base", "new"):
        raise DataError(f"unknown class subset {which!r}; choose all, base or new")
    if which == "all":
        return list(ds.classnames), [list(s) for s in splits]
    labels = sorted({item.label for item in splits[0]})
    m = math.ceil(len(labels) / 2)
    keep = labels[:m] if which == "base" else labels[m:]
    new_label = {old: new for new, old in enumerate(keep)}
    lists = [[replace(it, label=new_label[it.label]) for it in s if it.label in new_label] for s in splits]
    return [ds.classnames[old] for old in keep], lists


# ------------------------------------------------------------------------------------- vocabularies

WORDNET_NOUNS = "/usr/share/wordnet/data.noun"  # Debian/Ubuntu package wordnet-base


def prompt_key(name: str) -> str:
    """A name as CLIP's tokenizer sees it: "_" -> " ", whitespace collapsed, lower case (the BPE
    tokenizer lower-cases its input), so "State" and "state" are one prompt."""
    return " ".join(name.replace("_", " ").split()).lower()


def unique_names(names) -> list[str]:
    """Names with one spelling per prompt_key: the first in order is kept ("state" before "State")."""
    first: dict[str, str] = {}
    for name in names:
        first.setdefault(prompt_key(name), name)
    return list(first.values())


def wordnet_nouns() -> list[str]:
    """Noun lemmas of WordNet ("_" -> " "), de-duplicated case-insensitively in file order (~117.8k of
    119k lemmas; 1,221 names such as state / State would otherwise be identical prompts that split the
    teacher's probability and take several of KDPL-CA's K slots): the open vocabulary that KDPL-CA's
    offline dictionary, DeMul's D_name and EMPL's unseen words draw from. Read from nltk's corpus when
    it is installed with its data, else from Debian's wordnet-base files."""
    try:
        from nltk.corpus import wordnet
        lemmas = [name for synset in wordnet.all_synsets("n") for name in synset.lemma_names()]
    except (ImportError, LookupError):
        if not os.path.isfile(WORDNET_NOUNS):
            raise DataError("WordNet is not installed: `apt-get install wordnet-base` (Debian/Ubuntu), or "
                            "`pip install nltk && python -m nltk.downloader wordnet`; or pass your own list "
                            "of names with the method's file flag") from None
        lemmas = []
        with open(WORDNET_NOUNS) as f:
            for line in f:
                if line[0].isdigit():  # data lines: offset lex_filenum ss_type w_cnt(hex) word lex_id ...
                    fields = line.split()
                    lemmas += fields[4:4 + 2 * int(fields[3], 16):2]
    return unique_names(lemma.replace("_", " ") for lemma in lemmas)


def read_names(path: str) -> list[str]:
    """Class names from a file: a CSV with a `ClassName` column (KDPL's dictionary format) or plain
    text with one name per line; blank lines dropped and names de-duplicated as unique_names does
    (KDPL's own dictionary has no such duplicates: nothing changes for it)."""
    import csv

    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"cannot read the names file {path}: {e.strerror}") from None
    lines = text.splitlines()
    if lines and "ClassName" in next(csv.reader([lines[0]])):
        names = [row["ClassName"] for row in csv.DictReader(lines)]
    else:
        names = lines
    names = unique_names(n.strip() for n in names if n.strip())
    if not names:
        raise DataError(f"the names file {path} holds no names (one per line, or a CSV with a ClassName column)")
    return names
