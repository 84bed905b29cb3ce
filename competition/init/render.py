"""What every key of a generated config means, and the commented YAML it is written as."""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from competition.config import FORMATS, TTA_VIEWS, CompetitionConfig, ConfigError, validate

# --------------------------------------------------------------------------------------------- #
# What every key means (the comment written above it); a draft adds how it was chosen
# --------------------------------------------------------------------------------------------- #
DOC = {
    "name": "the competition's name: this file is configs/competitions/<name>.yaml, the split folds/<name>.csv",
    "data_root": "the data folder, relative to the project folder (where you run make) when it lies inside it",
    "format": f"how the labels are stored: {', '.join(FORMATS)}",
    "task": "multiclass: one class per pixel (softmax; background is implicit, every unlabelled pixel); "
            "multilabel: classes may overlap (one sigmoid per class)",
    "classes": "the class names, in output-channel order: what tables, W&B and plots show",
    "ignore": "unlabelled (void) pixels: always left out of the loss",
    "ignore.value": "what marks them: the mask pixel value (mask_folders), the class column's value (rle_csv) "
                    "or the label name (polygon_json)",
    "ignore.metric": "exclude: the competition's metric skips void pixels (validation, OOF and `competition "
                     "score` leave them out); background: it scores them as background",
    "image": "how images are read",
    "image.channels": "grayscale or rgb: the network's input channels",
    "image.bit_depth": "8 or 16 bits per channel",
    "groups": "images of one group never share a fold (no leak between near-duplicate images)",
    "groups.source": "column: a column of groups.csv (or of the train CSV); folder: the image's sub-folder; "
                     "none: every image is its own group",
    "groups.csv": "the per-image CSV holding the group column, relative to data_root",
    "groups.id_column": "that CSV's image-id column (with or without the file extension)",
    "groups.column": "that CSV's group column",
    "stratify": "how folds are balanced",
    "stratify.by": "class_presence: on which classes each image holds (the rarest one when there are too "
                   "many combinations); rare_class, column or none (plain GroupKFold) are the others",
    "metric": "the competition's metric",
    "metric.name": "dice: Dice per image x class, averaged over every pair",
    "metric.empty_score": "the Dice of a pair whose truth and prediction are both empty",
    "submission": "the submission CSV: one row per test image x class",
    "submission.id_column": "its image-id column",
    "submission.class_column": "its class column (it holds the class values when classes is a mapping)",
    "submission.rle_column": "its RLE column: 1-based 'start length' pairs, an empty cell for an empty mask",
    "submission.pixel_order": "row-major (left to right, then down) or column-major (top to bottom, then right)",
    "submission.id_format": "how an image is named in it: filename (with extension), stem (without) or id "
                            "(the path under the image folder without extension)",
    "submission.sample_submission": "the competition's sample submission, relative to data_root: the "
                                    "submission lists its images in its order",
    "submission.test_truth": "the test set's truth (when you have it), relative to data_root: what "
                             "`competition score SUB` scores against",
    "polygon_json": "the polygon JSON layout: <folder>/<group>/<image> images, <group>/<image>.json labels",
    "polygon_json.train_images": "the training images folder, relative to data_root",
    "polygon_json.train_labels": "the label folder: {\"annotations\": [{\"label\": ..., \"points\": [[x, y], "
                                 "...]}, ...]} per image",
    "polygon_json.test_images": "the test images folder (<group>/<image>), relative to data_root",
    "polygon_json.image_ext": "the images' file extension",
    "rle_csv": "the Kaggle RLE CSV layout: an image folder and a CSV of run-length encoded masks",
    "rle_csv.images": "the training images folder, relative to data_root; every image in it is a training "
                      "image (one without CSV rows has empty masks)",
    "rle_csv.csv": "the train CSV, relative to data_root",
    "rle_csv.id_column": "its image-id column (with or without the file extension)",
    "rle_csv.class_column": "its class column",
    "rle_csv.rle_column": "its RLE column",
    "rle_csv.pixel_order": "the order its runs number pixels in: row-major or column-major",
    "rle_csv.test_images": "the test images folder, relative to data_root (null: none)",
    "rle_csv.image_ext": "the images' file extension",
    "mask_folders": "the mask folder layout: one mask PNG per image (or one per image and class)",
    "mask_folders.images": "the training images folder, relative to data_root",
    "mask_folders.masks": "the masks folder, relative to data_root",
    "mask_folders.mask_mode": "binary: one 0/255 mask per image (one class); index: pixel value = class "
                              "index + 1, 0 = background; per_class: masks/<id>/<class>.png",
    "mask_folders.test_images": "the test images folder, relative to data_root (null: none)",
    "mask_folders.image_ext": "the images' file extension",
    "tta": f"test-time augmentations allowed ({', '.join(TTA_VIEWS)}): drop the ones that make no sense for "
           "this data",
    "folds": "K of the K-fold split (at most the number of groups)",
    "fold_seed": "the split's seed: change it to draw another split",
}

EXP_DOC = {
    "competition": "the competition this experiment trains on (configs/competitions/<name>.yaml)",
    "model": "the network",
    "model.arch": "any segmentation_models_pytorch architecture (Unet, FPN, DeepLabV3Plus, Segformer, ...) "
                  "or unet3plus",
    "model.encoder": "an smp encoder (resnet18, efficientnet-b3, ...) or a timm one as tu-<name>",
    "model.encoder_weights": "null: random init; imagenet (needs internet or a warm cache) or a local file",
    "loss": "the training loss",
    "loss.terms": "a weighted sum: bce is binary cross-entropy per class (multilabel) or cross-entropy over "
                  "the classes (multiclass); dice is the soft Dice loss",
    "optimizer": "any timm optimizer",
    "optimizer.name": "adamw, sgd, lamb, lion, ...",
    "optimizer.lr": "the peak learning rate",
    "optimizer.weight_decay": "decoupled weight decay",
    "scheduler": "the learning-rate schedule",
    "scheduler.name": "cosine, onecycle, plateau or none",
    "scheduler.warmup_epochs": "epochs of linear warm-up",
    "augment": "albumentations transforms, {name: Transform, p: ..., its arguments}",
    "augment.preprocess": "applied to training, validation and test images alike",
    "augment.train": "applied to training images only",
    "data": "how images become network inputs",
    "data.input_size": "the network input in pixels: an int (square) or [height, width]; multiples of 32",
    "data.resize": "stretch: resized to input_size; letterbox: the aspect ratio kept (resized to fit, padded)",
    "data.batch_size": "images per step",
    "data.workers": "DataLoader processes: 0 is fastest on a 2-core CPU; use 8 or more on a GPU machine",
    "train": "the training loop",
    "train.epochs": "epochs per fold",
    "train.seed": "the run's seed (sampling and augmentation)",
}


@dataclass
class Draft:
    """A config being written: plain data in key order, a comment per key, and what was decided."""

    data: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)  # dotted key -> how it was chosen (appended to DOC)
    decided: list = field(default_factory=list)
    undecided: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def set(self, key: str, value, why: str = "") -> None:
        *parents, last = key.split(".")
        d = self.data
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
        if why:
            self.why[key] = why

    def get(self, key: str, default=None):
        d = self.data
        for p in key.split("."):
            if not isinstance(d, dict) or p not in d:
                return default
            d = d[p]
        return d

    def drop(self, key: str) -> None:
        *parents, last = key.split(".")
        d = self.data
        for p in parents:
            d = d.get(p, {})
        d.pop(last, None)


# --------------------------------------------------------------------------------------------- #
# Rendering: YAML with a comment above every key, checked to read back as the same data
# --------------------------------------------------------------------------------------------- #
def _flow(v) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _comment(text: str, indent: str, width: int = 110) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(indent) + 2 + len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return [f"{indent}# {line}" for line in lines + ([cur] if cur else [])]


def render(data: dict, doc: dict, why: dict, header: list[str], prefix: str = "", depth: int = 0) -> str:
    """``data`` as block YAML, each key preceded by its ``doc`` (+ ``why``) comment."""
    out = [f"# {h}" if h else "#" for h in header] + ([""] if header else [])
    indent = "  " * depth
    for k, v in data.items():
        key = f"{prefix}{k}"
        if prefix != "classes.":  # the entries of a {value: name} mapping are explained by `classes`
            if key not in doc:
                raise KeyError(f"no comment for key {key!r}")  # a bug here, never the user's
            note = why.get(key)
            out += _comment(doc[key] + (f" ({note})" if note else ""), indent)
        if isinstance(v, dict) and v:
            out.append(f"{indent}{_flow(k)}:")
            out.append(render(v, doc, why, [], f"{key}.", depth + 1))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{indent}{_flow(k)}:")
            out += [f"{indent}  - {_flow(x)}" for x in v]
        else:
            out.append(f"{indent}{_flow(k)}: {_flow(v)}")
    return "\n".join(out)


def _ordered(data: dict) -> dict:
    keys = ["name", "data_root", "format", "task", "classes", "ignore", "image", "groups", "stratify", "metric",
            "submission", "polygon_json", "rle_csv", "mask_folders", "tta", "folds", "fold_seed"]
    return {k: data[k] for k in keys if k in data}


def _checked(d: Draft) -> CompetitionConfig:
    """The draft validated; a void value this version's ``ignore`` refuses is dropped, and said so."""
    try:
        return validate(CompetitionConfig, _ordered(d.data), "the draft config")
    except ConfigError:
        if "ignore" not in d.data:
            raise
        d.undecided.append("the void value did not validate as `ignore`; it was left out")
        d.drop("ignore")
        return validate(CompetitionConfig, _ordered(d.data), "the draft config")
