"""Typed configuration: the ONLY place YAML is read, validated and written.

A competition YAML (``configs/competitions/<name>.yaml``) says what a competition *is*: its data,
classes, groups, metric and submission format. An experiment YAML (``configs/experiments/<exp>.yaml``)
says how to train on it. Both are validated once, here, with errors that name the key and the
allowed values; everything downstream receives these frozen models, never raw dicts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from competition import paths
from competition.errors import ConfigError
from competition.io import ReadError, read_text
from competition.io import atomic_write_text as _io_atomic_write_text
from competition.paths import NAME_RULE, is_safe_name

# The project folder is the current directory (as for make and git): configs/, data/, folds/, runs/,
# ensembles/ and submissions/ are found there. Built-in configs ship beside the package as a fallback.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMPETITION = "synthetic-hands"


def config_dirs(kind: str) -> list[Path]:
    """Where ``configs/<kind>/`` YAML files are looked up: the project first, then the checkout."""
    dirs = [paths.project() / "configs" / kind, PACKAGE_ROOT / "configs" / kind]
    return list(dict.fromkeys(d.resolve() for d in dirs))


class Strict(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored), and so are NaN and infinity in
    any number (``lr: .nan`` would train to NaN; a NaN threshold or weight empties every mask)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The test-time augmentation views, defined once: the schema, `init`'s comments, the error messages and
# competition.predict.tta (each view's transform and its inverse) all read this list.
TTAView = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270"]
TTA_VIEWS: tuple[str, ...] = get_args(TTAView)


# --------------------------------------------------------------------------------------------- #
# Competition
# --------------------------------------------------------------------------------------------- #
class ImageSpec(Strict):
    channels: Literal["grayscale", "rgb"] = "grayscale"
    bit_depth: Literal[8, 16] = 8


class GroupSpec(Strict):
    """Where an image's group (patient, subject, imaging type) comes from.

    ``folder``: the parent folder of the image (hand-bone ``<ID>``); ``column``: a column of the
    adapter's metadata CSV (``csv`` names it, relative to the data root); ``none``: every image is
    its own group. ``id_column``: the metadata CSV's image-id column (Kaggle CSVs say ``ImageId``).
    """

    source: Literal["folder", "column", "none"] = "folder"
    column: str | None = None
    csv: str | None = None
    id_column: str = "id"

    @model_validator(mode="after")
    def _column_needs_name(self) -> "GroupSpec":
        if self.source == "column" and not self.column:
            raise ValueError("groups.source 'column' needs groups.column (the CSV column holding the group)")
        return self


class StratifySpec(Strict):
    """Stratification key for StratifiedGroupKFold.

    ``class_presence``: per-image signature of which classes are present (collapsed to the rarest
    present class when signatures are too many to stratify on); ``rare_class``: presence of the rarest
    class; ``column``: a column of the metadata CSV; ``none``: plain GroupKFold.
    """

    by: Literal["none", "class_presence", "rare_class", "column"] = "class_presence"
    column: str | None = None


class MetricSpec(Strict):
    """The competition's metric (``competition.metrics.METRICS``): ``name`` is a mean over image x class
    pairs computed from pixel counts (dice: the hand-bone leaderboard; iou), which validation, OOF, the
    ensemble search and the scorer all use; ``report`` lists metrics shown beside it."""

    name: Literal["dice", "iou"] = "dice"
    empty_score: float = Field(1.0, ge=0.0, le=1.0, description="the score when truth and prediction are both empty")
    report: list[Literal["dice", "iou", "f1_at_iou", "hausdorff95"]] = Field(default_factory=list)
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)  # f1_at_iou: the IoU that makes an image a hit

    @field_validator("name", mode="before")
    @classmethod
    def _pair_metric(cls, v):
        if v in ("f1_at_iou", "hausdorff95"):
            raise ValueError(f"{v!r} cannot be the competition's metric: training, OOF and the ensemble search "
                             f"need a mean over image x class pairs computed from pixel counts (dice, iou); "
                             f"list it in metric.report to see it beside them")
        return v


class SubmissionSpec(Strict):
    id_column: str = "image_name"
    class_column: str = "class"
    rle_column: str = "rle"
    pixel_order: Literal["row-major", "column-major"] = "row-major"
    # How an image id is written in the CSV: its file name with extension, without, or the adapter id.
    id_format: Literal["filename", "stem", "id"] = "filename"
    sample_submission: str | None = None  # relative to the data root
    test_truth: str | None = None  # relative to the data root; hidden test truth, for `competition score`
    kaggle: str | None = None  # the Kaggle competition slug, for `--upload` (kaggle competitions submit -c SLUG)
    # A code competition's run-time limit in hours (e.g. 9): `competition bundle` warns when its estimate
    # (measured on the machine making the bundle) exceeds 80% of it. null: no limit known, no warning.
    time_limit_h: Annotated[float, Field(gt=0)] | None = None


class PolygonJsonSpec(Strict):
    train_images: str = "train/DCM"
    train_labels: str = "train/outputs_json"
    test_images: str = "test/DCM"
    image_ext: str = ".png"


class RleCsvSpec(Strict):
    images: str = "train_images"
    csv: str = "train.csv"
    id_column: str = "id"
    class_column: str = "class"
    rle_column: str = "rle"
    pixel_order: Literal["row-major", "column-major"] = "row-major"
    test_images: str | None = "test_images"
    image_ext: str = ".png"
    # The class column's values, one per entry of `classes`, in order (a numeric ClassId: [1, 2, 3]);
    # null: the column holds the class names. Submissions and truth CSVs write these values too.
    class_values: list[Annotated[str, BeforeValidator(lambda v: _class_value(v))]] | None = None


def _class_value(v: Any) -> str:
    """A class value as the CSV cell reads it: YAML's 1 and "1" are the same value."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str) and v.strip():
        return v.strip()
    raise ValueError(f"a class value is an integer or a non-empty string, got {v!r}")


class MaskFoldersSpec(Strict):
    images: str = "images"
    masks: str = "masks"
    # binary: one 0/255 PNG per image (single class); index: pixel value = class index + 1 (0 = background);
    # per_class: masks/<id>/<class>.png, one 0/255 PNG per class.
    mask_mode: Literal["binary", "index", "per_class"] = "binary"
    test_images: str | None = None
    image_ext: str = ".png"


# The data formats, registered once: a format's name is its `format:` value, the key of its settings in
# a competition YAML (below, its class) and the module that reads it, ``competition/data/<name>.py``
# (whose Adapter registers under the same name). The `format` literal, the schema's sections, the
# configuration reference and the error messages are derived from this table; init's detectors
# (``competition.init.layouts.FINDERS``) and docs/competitions.md are held to it by a test.
FORMATS: dict[str, type[Strict]] = {
    "polygon_json": PolygonJsonSpec,
    "rle_csv": RleCsvSpec,
    "mask_folders": MaskFoldersSpec,
}
FormatName = Literal[tuple(FORMATS)]


class SyntheticSpec(Strict):
    """The embedded default: generated deterministically into the data root on first use."""

    subjects: int = Field(24, ge=4)
    test_subjects: int = Field(4, ge=1)
    images_per_subject: int = Field(2, ge=1)
    size: int = Field(256, ge=32)
    seed: int = 0


# The target value of an ignored pixel inside the pipeline (dataset targets, mixing, losses, validation):
# multiclass targets are class indices (0 = background) with IGNORE_INDEX where ignored; multilabel
# targets are {0, 1} per channel with IGNORE_INDEX on every channel of an ignored pixel.
IGNORE_INDEX = 255


class IgnoreSpec(Strict):
    """Unlabelled ("void") pixels: excluded from the loss always, and from the metric when it says so.

    ``value``: what marks them in the labels: a mask pixel value (``mask_folders`` ``index``/``binary``
    masks, e.g. 255; or ``per_class``: the file ``masks/<id>/<value>.png``), the class column's value
    (``rle_csv``: those rows' runs are the void region) or the label name (``polygon_json``: those
    polygons). A pixel that also carries a class label is labelled, not void. ``metric``: ``exclude``
    (the competition's metric ignores them: validation, OOF and ``competition score`` leave them out)
    or ``background`` (the metric counts them as background).
    """

    value: int | str
    metric: Literal["exclude", "background"] = "exclude"

    @field_validator("value")
    @classmethod
    def _not_blank(cls, v: int | str) -> int | str:
        if isinstance(v, bool) or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"ignore.value is a pixel value, class value or label name, got {v!r}")
        return v.strip() if isinstance(v, str) else v


class _Competition(Strict):
    """A competition YAML; :data:`CompetitionConfig` adds one settings section per entry of :data:`FORMATS`."""

    name: "SafeName"
    data_root: str
    format: FormatName
    classes: list[str] = Field(min_length=1)
    task: Literal["multilabel", "multiclass"] = "multilabel"
    image: ImageSpec = ImageSpec()
    groups: GroupSpec = GroupSpec()
    stratify: StratifySpec = StratifySpec()
    metric: MetricSpec = MetricSpec()
    submission: SubmissionSpec = SubmissionSpec()
    synthetic: SyntheticSpec | None = None
    # Test-time augmentations allowed for this competition (e.g. no vflip for upright hand X-rays).
    tta: list[TTAView] = ["identity", "hflip"]
    folds: int = Field(5, ge=2)
    fold_seed: int = 42
    ignore: IgnoreSpec | None = None  # void pixels (see IgnoreSpec); null: every pixel is labelled

    @model_validator(mode="before")
    @classmethod
    def _class_map(cls, data: Any) -> Any:
        """``classes: {value: name}`` is shorthand for ``classes: [names]`` + ``rle_csv.class_values``,
        the form every resolved config is written in."""
        if not (isinstance(data, dict) and isinstance(data.get("classes"), dict)):
            return data
        rle = data.get("rle_csv") or {}
        if isinstance(rle, BaseModel):
            rle = rle.model_dump(exclude_unset=True)
        if isinstance(rle, dict) and rle.get("class_values") is not None:
            raise ValueError("classes is a {value: name} mapping and rle_csv.class_values is set too; "
                             "give the class values once")
        mapping = data["classes"]
        rle = {**rle, "class_values": list(mapping)} if isinstance(rle, dict) else rle
        return {**data, "classes": list(mapping.values()), "rle_csv": rle}

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(f"class names must be unique; repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _values_match_classes(self) -> "_Competition":
        values = self.rle_csv.class_values
        if values is not None:
            if len(values) != len(self.classes):
                raise ValueError(f"rle_csv.class_values has {len(values)} value(s) {values} for "
                                 f"{len(self.classes)} classes {self.classes}; give one value per class, in order")
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"rle_csv.class_values must be unique; repeated: {dup}")
        return self

    @property
    def class_values(self) -> list[str]:
        """How the competition's CSVs write each class (train CSV, sample submission, submission,
        truth): ``rle_csv.class_values``, else the names. Tables, W&B and plots use the names."""
        return list(self.rle_csv.class_values or self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def out_channels(self) -> int:
        """The network's outputs: one per class, and background too when the classes exclude each other."""
        return self.num_classes + (1 if self.task == "multiclass" else 0)

    @property
    def in_channels(self) -> int:
        return 1 if self.image.channels == "grayscale" else 3

    def root(self) -> Path:
        """The data root, absolute; a relative one is taken from the project folder (the cwd)."""
        p = Path(self.data_root).expanduser()
        return p if p.is_absolute() else (paths.project() / p)


# Built, not written out, so that a new format is one entry in FORMATS: each format's settings are the
# section of the same name (``rle_csv: {csv: train.csv, ...}``), defaults when absent.
CompetitionConfig = create_model("CompetitionConfig", __base__=_Competition, __module__=__name__,
                                 **{name: (spec, spec()) for name, spec in FORMATS.items()})


# --------------------------------------------------------------------------------------------- #
# Loading and dumping
# --------------------------------------------------------------------------------------------- #
def _format_validation_error(path: Path | str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            valid = sorted(parent.model_fields) if parent is not None else []
            msg = f"unknown key; valid keys here: {', '.join(valid)}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` through nested fields."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    for arg in getattr(ann, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return ann


def read_yaml(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        data = yaml.safe_load(read_text(path, "configuration file"))
    except ReadError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict, source: Path | str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e, model)) from None


def find_config(kind: str, name_or_path: str | Path) -> Path:
    """``configs/<kind>/<name>.yaml`` (project first, then built-in), or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    for d in config_dirs(kind):
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    known = sorted({q.stem for d in config_dirs(kind) for q in d.glob("*.yaml")})
    raise ConfigError(f"unknown {kind[:-1]} {str(name_or_path)!r}; known: {', '.join(known) or '(none)'} "
                      f"(or pass a path to a YAML file)")


def load_competition(name_or_path: str | Path = DEFAULT_COMPETITION) -> CompetitionConfig:
    path = find_config("competitions", name_or_path)
    return validate(CompetitionConfig, read_yaml(path), path)


def to_plain(cfg: BaseModel) -> dict:
    """Plain data (str/int/float/list/dict) for YAML files and checkpoints."""
    return cfg.model_dump(mode="json")


def atomic_write_text(path: Path | str, text: str) -> None:
    """Kept for the modules that import it from here: :func:`competition.io.atomic_write_text`."""
    _io_atomic_write_text(path, text)


def dump_yaml(data: dict | BaseModel, path: Path | str) -> None:
    if isinstance(data, BaseModel):
        data = to_plain(data)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------------------------- #
# Experiment
# --------------------------------------------------------------------------------------------- #
DEFAULT_EXPERIMENT = "baseline"


class ModelConfig(Strict):
    """``arch``: any smp architecture name (Unet, UnetPlusPlus, FPN, ...), ours (``unet3plus``, ``nnunet``:
    nnU-Net's 2D U-Net planned from ``data.input_size``, ``hrnetv2``: the HRNetV2 head on a ``tu-hrnet_*``
    encoder), or a plug-in: an import path ``package.module:factory`` (the project folder is searched when
    the module is not importable otherwise) or an entry point of the group ``competition.architectures``,
    called as ``factory(in_channels=, classes=, **kwargs)`` (docs/extending.md). ``encoder``,
    ``encoder_weights``, ``encoder_depth`` and ``decoder_channels`` do not apply to nnunet and plug-ins.

    ``encoder``: an smp encoder name or a timm one as ``tu-<name>``. ``encoder_weights``: null (random
    init, the default), ``imagenet`` (needs internet or a warm cache) or a path to a local weights file.
    ``output_scale``: >1 adds the high-resolution head (predict at k x the input size).
    ``init_from``: start from a trained model's weights (docs/training.md, "Starting from a trained model").
    """

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    encoder_depth: int = Field(5, ge=3, le=5)
    decoder_channels: list[int] | None = None
    deep_supervision: bool = False  # unet3plus, nnunet, plug-ins: one output per decoder stage while training
    output_scale: int = Field(1, ge=1, le=8)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed through to the architecture (plug-in: factory)
    # Whole-model init (nnU-Net's -pretrained_weights; progressive resizing; fine-tuning a finished run): a
    # checkpoint, relative to the project folder, e.g. runs/<exp>/fold{fold}/best.pt; {fold} becomes the
    # fold being trained, and is required for a CV fold (any other fold's model, or a full-data one, has
    # seen fold k's validation images). Weights only: optimizer, schedule and epochs start fresh; a resumed
    # run (last.pt) does not read it again. The path and sha256 go into the run's config.yaml.
    init_from: str | None = Field(None, min_length=1)
    # Leave the parent's head out: the segmentation head's tensors and any whose shape differs (a changed
    # class count); they keep their fresh init.
    init_skip_head: bool = False


class LossTerm(Strict):
    name: str  # bce, dice, focal, tversky, jaccard, lovasz
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)


class LossConfig(Strict):
    terms: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="bce"), LossTerm(name="dice")])
    # null: equal; "inverse_frequency": 1 - pixel frequency of each class on the training fold;
    # or an explicit list, one weight per class.
    class_weights: None | Literal["inverse_frequency"] | list[float] = None
    # Weights of the deep-supervision outputs, finest first; null = all 1, normalised to sum 1.
    deep_supervision_weights: list[float] | None = None


class OptimizerConfig(Strict):
    name: str = "adamw"  # any timm optimizer: sgd, sgdp, adam, adamw, adamp, radam, lamb, lion, ...
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.9
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(Strict):
    name: Literal["none", "cosine", "onecycle", "plateau"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = 1e-6
    patience: int = 3  # plateau only
    factor: float = 0.5  # plateau only


class Transform(Strict):
    """One albumentations transform: ``{name: Affine, p: 0.5, rotate: [-15, 15]}`` in YAML."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str


class BatchMix(Strict):
    """A batch-level augmentation (albumentations works per sample, so these cannot be transforms):
    ``mixup`` and ``cutmix`` (Beta(alpha, alpha) mixing, masks mixed consistently) and ``copy_paste``
    of rare-class instances between images of a batch."""

    name: Literal["mixup", "cutmix", "copy_paste"]
    p: float = Field(0.5, ge=0.0, le=1.0)  # probability per batch
    alpha: float = Field(1.0, gt=0.0)  # Beta(alpha, alpha) for mixup / cutmix
    classes: list[str] | Literal["rare"] = "rare"  # copy_paste: class names, or the rare-class rule


class AugmentConfig(Strict):
    preprocess: list[Transform] = Field(default_factory=list)  # train, validation and test alike
    train: list[Transform] = Field(default_factory=list)  # training only
    batch: list[BatchMix] = Field(default_factory=list)  # training only, applied to whole batches


class PseudoConfig(Strict):
    """``data.pseudo``: fold k trains on ``runs/_pseudo/<name>/fold<k>/`` as well, the test images the
    recipe's fold-k models labelled; ``weight``: how often one is drawn relative to a labelled image."""

    name: "SafeName"
    weight: float = Field(1.0, gt=0.0)


def _size_hw(v: Any, key: str) -> int | list[int]:
    """An int (square) or [h, w], each at least 16 pixels."""
    ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 16) or (
        isinstance(v, (list, tuple)) and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 16 for x in v))
    if not ok:
        raise ValueError(f"{key} is a size in pixels: an integer >= 16 (square) or [height, width], got {v!r}")
    return v if isinstance(v, int) else [int(x) for x in v]


def size_hw(v: int | list[int]) -> tuple[int, int]:
    """(h, w) of a size key given as an int (square) or [h, w]."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class DataConfig(Strict):
    # The network input in pixels: an int (square) or [height, width].
    input_size: int | list[int] = 128
    # How a whole image is brought to input_size (and to crop_from): stretch (resized to it, the aspect
    # ratio changes) or letterbox (the aspect ratio kept: resized to fit, padded bottom/right; training,
    # validation, OOF and test alike). Predictions are unpadded, then resized to each image's native size.
    resize: Literal["stretch", "letterbox"] = "stretch"
    # resize: the whole image resized to input_size; crop: random input_size crops of the image at
    # ``crop_from`` resolution for training, whole (resized to crop_from) images for validation.
    policy: Literal["resize", "crop"] = "resize"
    crop_from: int | None = None
    batch_size: int = Field(8, ge=1)
    workers: int = Field(2, ge=0)
    rare_class_oversample: float = Field(0.0, ge=0.0)  # 0 = uniform; k = images with rare classes drawn (1+k)x
    rare_class_quantile: float = Field(0.25, gt=0.0, le=1.0)  # classes present in fewer images are rare
    # Cache each image after decoding, deterministic preprocessing and resizing to the working size,
    # and each mask rasterised there (bit-packed), in a memory-mapped file reused by every epoch,
    # validation, OOF and fold; keyed by the data's fingerprint and the settings that shape it.
    cache: bool = False
    # Pseudo-labelled test images (`competition pseudo`) added to every fold's training images only.
    pseudo: "PseudoConfig | None" = None
    # Curated data: images left out of training (every fold's and the all-data run's) and out of OOF
    # scoring (`competition oof`, metrics.json, `make ensemble`), e.g. label errors found with
    # `competition oof EXP --suspects`. A list of image ids, or the path (relative to the project
    # folder) of a CSV with columns `id` and `reason` (more columns allowed). The folds file keeps them
    # (splits stay stable) and their OOF is still predicted (`competition oof --include-excluded`).
    exclude: list[str] | str | None = Field(
        None, description="image ids left out of training and OOF scoring: a list of ids, or a CSV path "
                          "(relative to the project folder) with columns id, reason")

    @field_validator("input_size", mode="before")
    @classmethod
    def _input_size(cls, v: Any) -> int | list[int]:
        return _size_hw(v, "data.input_size")

    @field_validator("exclude", mode="before")
    @classmethod
    def _exclude_ids(cls, v: Any) -> Any:
        # YAML reads an unquoted numeric id (`[12, 345]`) as an int; ids are strings everywhere else.
        if isinstance(v, (list, tuple)):
            return [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in v]
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: Any) -> list[str] | str | None:
        if isinstance(v, str) and not v.strip().lower().endswith(".csv"):
            raise ValueError(f"data.exclude is a list of image ids or the path of a CSV file (*.csv) with columns "
                             f"id, reason; got the string {v!r} (one id? write it as a list: [{v}])")
        if isinstance(v, list) and any(not i.strip() for i in v):
            raise ValueError("data.exclude lists an empty image id")
        return v

    @property
    def input_hw(self) -> tuple[int, int]:
        return size_hw(self.input_size)


class SwaConfig(Strict):
    """Stochastic weight averaging (torch.optim.swa_utils): weights averaged every epoch from
    ``start_epoch`` at the constant learning rate ``lr``; BatchNorm statistics recomputed after."""

    start_epoch: int = Field(..., ge=1)
    lr: float = Field(..., gt=0.0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model for training (GPU; off by default)
    sync_bn: bool | None = None  # SyncBatchNorm under DDP; null: on when the world size is > 1
    # Weight averaging at the end of training; the average becomes best.pt only if it scores better.
    swa: "SwaConfig | None" = None
    average_top_k: int | None = Field(None, ge=2)  # mean of the k best epochs' weights (timm's avg_checkpoints)
    channels_last: bool = True
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = 1.0
    ema: float | None = None  # e.g. 0.999; null disables weight EMA
    early_stopping: int | None = None  # patience in epochs; null disables
    seed: int = 0
    deterministic: bool = True
    threshold: float = 0.5  # validation binarisation threshold (multilabel)
    progress: bool = True


class OofConfig(Strict):
    # Gone: the OOF is kept at each image's original size (the leaderboard's), whatever the model's.
    size: None = Field(None, exclude=True)
    # The TTA variant written beside the plain OOF after training (views from the competition's
    # `tta`); null: the competition's whole `tta` list; [] or [identity]: the plain OOF only.
    tta: list[TTAView] | None = None
    tta_scales: list[float] = [1.0]

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("oof.size is gone: OOF is kept at each image's original size (the leaderboard's), "
                             "whatever the model's output size; remove the key")
        return None


class TrackingConfig(Strict):
    """Where W&B runs go. W&B's own variables win over these keys, as in W&B itself (``WANDB_PROJECT`` >
    ``project`` > the competition name; ``WANDB_ENTITY`` > ``entity`` > the login's default entity)."""
    wandb: bool = True
    project: str | None = None  # default: the competition name
    entity: str | None = None  # W&B team or user; default: the login's default entity
    group: str | None = None  # W&B group; default: the experiment name (tuning groups trials by study)
    # None means "train"; `competition tune` sets "tune" on its trials. Optional so that run folders
    # written before this key existed still resume (their config.yaml lacks it).
    job_type: Literal["train", "tune"] | None = None


def _safe_name(v: str) -> str:
    """Names become folder and file names (runs/<exp>/, folds/<comp>.csv, ensembles/<name>.yaml)."""
    if not is_safe_name(v):
        raise ValueError(f"{v!r} is not a safe name: use {NAME_RULE}")
    return v


SafeName = Annotated[str, AfterValidator(_safe_name)]


class ExperimentConfig(Strict):
    name: SafeName
    competition: SafeName = DEFAULT_COMPETITION
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    augment: AugmentConfig = AugmentConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    oof: OofConfig = OofConfig()
    tracking: TrackingConfig = TrackingConfig()


def load_experiment(name_or_path: str | Path = DEFAULT_EXPERIMENT,
                    overrides: dict | None = None) -> ExperimentConfig:
    """Read an experiment; ``extends: <other>`` merges it over another experiment (:func:`merge`).

    ``overrides`` (dotted keys -> values, from tuning or ``--set``) are applied last by the same rule,
    then validated like the YAML (an unknown key is an error listing the valid ones).
    """
    path = find_config("experiments", name_or_path)
    data = _resolve_extends(path, seen=())
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides)
    return validate(ExperimentConfig, data, path if not overrides else f"{path} with --set {_show(overrides)}")


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Dotted keys -> values merged into a plain experiment dict by :func:`merge` (not validated)."""
    for key, value in (overrides or {}).items():
        *parents, last = key.split(".")
        patch: Any = value
        for part in reversed([*parents, last]):
            patch = {part: patch}
        try:
            data = merge(data, patch)
        except ConfigError as e:
            raise ConfigError(f"override {key!r}: {e}") from None
    return data


def _show(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def merge(base: Any, child: Any, _top: bool = True) -> Any:
    """The one rule for ``extends:`` and overrides: mappings merge key by key, all the way down;
    anything else (a value, a list) replaces. A mapping that changes ``name`` (optimizer, scheduler,
    a transform...) replaces the parent's mapping whole, so keys that belonged to the old name (a
    cosine schedule's ``warmup_epochs`` under ``onecycle``) are not left behind."""
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return child
    if not _top and "name" in child and "name" in base and child["name"] != base["name"]:
        return dict(child)
    out = dict(base)
    for k, v in child.items():
        out[k] = merge(base[k], v, False) if k in base else v
    return out


def parse_overrides(items: list[str] | None) -> dict:
    """``--set key.sub=value`` (repeatable) -> {dotted key: value}; values are YAML (numbers, lists, null)."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. --set train.epochs=3")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def _resolve_extends(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _resolve_extends(find_config("experiments", parent), seen + (path,))
    base.pop("name", None)
    return merge(base, data)


# --------------------------------------------------------------------------------------------- #
# Ensemble recipe (ensembles/<name>.yaml): written by `competition ensemble`, read by `submit`
# --------------------------------------------------------------------------------------------- #
# A recipe is written by `make ensemble` but read back from a file anyone can edit (Strict refuses NaN
# and inf in every model; said again here, where a NaN weight would empty every RLE).
Finite = Annotated[float, Field(allow_inf_nan=False)]


class RecipeCheckpoint(Strict):
    path: str  # relative to the project folder, e.g. runs/baseline/fold0/best.pt
    sha256: str = Field(pattern=r"^[0-9a-f]{16,64}$")  # content hash (first 16 hex digits), checked before use


class RecipeMember(Strict):
    experiment: SafeName
    # The CV folds whose OOF chose this member's weight (and the recipe's thresholds and post-processing).
    folds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    # The models submit averages: one per fold (in ``folds`` order), or with ``full_data`` the one model
    # trained on every training image (runs/<exp>/all-data/best.pt).
    checkpoints: list[RecipeCheckpoint] = Field(min_length=1)
    full_data: bool = False
    # Lineage, for the record: the checkpoint each model started from (model.init_from), by run
    # (``fold<k>`` / ``all-data``); empty when every model started from scratch.
    init_from: dict[str, RecipeCheckpoint] = Field(default_factory=dict)
    # One weight (global) or one per class; the members' weights sum to 1 (per class).
    weights: list[Annotated[Finite, Field(ge=0)]] = Field(min_length=1)
    # The OOF variant this member was chosen as: its TTA views and scales, applied at submit time.
    tta: list[TTAView] = Field(["identity"], min_length=1)
    tta_scales: list[Annotated[Finite, Field(gt=0)]] = Field([1.0], min_length=1)

    @model_validator(mode="after")
    def _one_checkpoint_per_fold(self) -> "RecipeMember":
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"member {self.experiment}: folds {self.folds} list a fold twice")
        if self.full_data:
            if len(self.checkpoints) != 1:
                raise ValueError(f"member {self.experiment}: full_data: true takes one checkpoint (the model "
                                 f"trained on all the data), got {len(self.checkpoints)}")
        elif len(self.checkpoints) != len(self.folds):
            raise ValueError(f"member {self.experiment}: {len(self.checkpoints)} checkpoints for "
                             f"{len(self.folds)} folds {self.folds}; expected one per fold")
        return self


class PostProcess(Strict):
    # components smaller than this (pixels at the original size) are removed
    min_area: Annotated[int, Field(ge=0)] | None = None
    keep_largest: bool = False


class RecipeExclusion(Strict):
    """The curated images (members' ``data.exclude``, their union) left out of the recipe's choice and scores."""
    count: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{16,64}$")  # of the sorted ids (folds.ids_hash): a list and a CSV agree
    scored: bool = False  # true: `make ensemble --include-excluded` chose and scored on them too


class Recipe(Strict):
    name: SafeName
    competition: SafeName
    task: Literal["multilabel", "multiclass"]
    classes: list[str]
    folds_sha256: str  # hash of folds/<competition>.csv the OOF scores were computed on
    members: list[RecipeMember] = Field(min_length=1)
    thresholds: list[float]  # per class (multilabel); ignored for multiclass (argmax)
    postprocess: dict[str, PostProcess] = Field(default_factory=dict)  # class name -> rule
    # Recipes before OOF moved to the original sizes blended at this size; such a recipe is refused.
    oof_size: None = Field(None, exclude=True)

    @field_validator("oof_size", mode="before")
    @classmethod
    def _oof_size(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("a recipe from an earlier version, which blended members at an OOF size; build it "
                             "again with `make ensemble` (after `competition oof EXP` re-predicts each member's "
                             "OOF at the original sizes)")
        return None
    scores: dict[str, Any] = Field(default_factory=dict)  # in_sample, nested, per_class, best_single, ...
    # The pseudo-label sets (data.pseudo) any member trained on: its test predictions lean on them.
    pseudo_labels: list[str] = Field(default_factory=list)
    # The members' excluded images (data.exclude); null in recipes written before the key existed.
    excluded: RecipeExclusion | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        """What the submission needs to be right, checked once where every reader passes: a class per
        threshold, each threshold a probability strictly inside (0, 1) (at 0 or below every pixel is
        predicted, at 1 or above none), weights that give every class a positive total, rules for
        classes that exist."""
        n = len(self.classes)
        if n == 0 or len(set(self.classes)) != n:
            raise ValueError(f"classes {self.classes}: expected distinct class names, at least one")
        if len(self.thresholds) != n:
            raise ValueError(f"thresholds: {len(self.thresholds)} values for {n} classes; expected one per class")
        for c, t in zip(self.classes, self.thresholds):
            if not (isinstance(t, float | int) and math.isfinite(t) and 0.0 < t < 1.0):
                raise ValueError(f"thresholds: {t!r} for class {c!r}; expected a probability strictly between "
                                 f"0 and 1 (0 or less predicts every pixel, 1 or more none)")
        for m in self.members:
            if len(m.weights) not in (1, n):
                raise ValueError(f"members[{m.experiment}].weights: {len(m.weights)} values; expected 1 (global) "
                                 f"or {n} (one per class)")
        per_class = [[m.weights[0] if len(m.weights) == 1 else m.weights[i] for m in self.members] for i in range(n)]
        empty = [c for c, ws in zip(self.classes, per_class) if not sum(ws) > 0]
        if empty:
            raise ValueError(f"members' weights sum to 0 for class(es) {empty}; expected a positive total per class "
                             f"(every weight >= 0)")
        unknown = sorted(set(self.postprocess) - set(self.classes))
        if unknown:
            raise ValueError(f"postprocess: unknown class(es) {unknown}; expected names from classes")
        return self


def load_recipe(name_or_path: str | Path) -> Recipe:
    """``ensembles/<name>.yaml`` in the project, or a path."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = paths.recipe(str(name_or_path))
    return validate(Recipe, read_yaml(p), p)


# --------------------------------------------------------------------------------------------- #
# Search space (configs/search/<name>.yaml): read by `competition tune`
# --------------------------------------------------------------------------------------------- #
class SearchParam(Strict):
    """One searched value, addressed by a dotted experiment key (list items by index: ``loss.terms.1.weight``).

    ``float``/``int``: ``low``..``high``, optionally on a ``log`` scale or with a ``step``.
    ``categorical``: ``choices``, a list of plain values, or a mapping label -> value for structured
    values (Optuna records the label). ``symmetric``: the sampled v is used as ``[-v, v]`` (the
    albumentations range form, e.g. ``Affine`` ``rotate``).
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | dict[str, Any] | None = None
    symmetric: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "SearchParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list or mapping")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes `choices`, not `low`/`high`")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs `low` < `high` (got {self.low}, {self.high})")
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes `low`/`high`, not `choices`")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("`log: true` needs `low` > 0 and no `step`")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"an int parameter needs whole `low`/`high`/`step` (got {self.low}, {self.high})")
        return self


class SearchBudget(Strict):
    epochs: int = Field(ge=1)  # train.epochs of every trial
    folds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # trained in turn; score = mean


class SearchSampler(Strict):
    name: Literal["tpe", "random"] = "tpe"
    # None: each worker process seeds itself (host, PID, start time), so workers never replay each
    # other's draws. A number reproduces a single worker's study; workers on several machines would share it.
    seed: int | None = None
    startup_trials: int = Field(4, ge=0)  # TPE: random trials before the model takes over


class SearchPruner(Strict):
    name: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(2, ge=0)  # median: trials that finish before any is pruned
    warmup_epochs: int = Field(1, ge=0)  # median: epochs of every trial that are never pruned
    min_resource: int = Field(1, ge=1)  # hyperband: epochs of the first rung
    reduction_factor: int = Field(3, ge=2)  # hyperband


class SearchSpace(Strict):
    trials: int = Field(20, ge=1)  # finished trials the study should hold (TRIALS overrides)
    budget: SearchBudget
    sampler: SearchSampler = SearchSampler()
    pruner: SearchPruner = SearchPruner()
    fixed: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value for every trial only
    params: dict[str, SearchParam] = Field(min_length=1)


def load_search(name_or_path: str | Path) -> SearchSpace:
    """``configs/search/<name>.yaml`` (project first, then built-in), or a path."""
    path = find_config("search", name_or_path)
    return validate(SearchSpace, read_yaml(path), path)
