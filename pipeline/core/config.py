"""Typed configuration: `params.yaml` maps onto `Config`; unknown keys and bad values are rejected by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from pipeline.core.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)

_RATIO = re.compile(r"^\s*([0-9.]+)\s*/\s*([0-9.]+)\s*$")


def parse_budget(value: Any) -> float:
    """Accept 0.03, "0.03" or "8/255" (the way papers write L-inf budgets)."""
    if isinstance(value, bool):
        raise ValueError("expected a number or a ratio such as 8/255")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _RATIO.match(value)
        if m:
            den = float(m.group(2))
            if den == 0:
                raise ValueError(f"division by zero in {value!r}")
            return float(m.group(1)) / den
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number or a ratio such as 8/255, got {value!r}")


def format_budget(eps: float) -> str:
    """Render a budget as n/255 when it is one (for metric keys and logs)."""
    n = round(eps * 255)
    if abs(n - eps * 255) < 1e-6:
        return f"{n}/255"
    return f"{eps:.6g}"


Budget = Annotated[float, BeforeValidator(parse_budget), Field(ge=0.0, le=1.0)]
Share = Annotated[float, BeforeValidator(parse_budget), Field(ge=0.0, le=1.0)]  # a share in [0, 1], e.g. 1/4
Fraction = Annotated[float, BeforeValidator(parse_budget), Field(gt=0.0, le=1.0)]  # a share in (0, 1], e.g. 7/8
# Seeds are mixed into other seeds (seed * 100003 + epoch, + rank): keep them where torch's 64-bit seeds hold them.
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `eps: .nan` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class DataConfig(_Strict):
    root: Optional[str] = Field(None, description="dataset root; ignored for the embedded `digits` default")
    image_size: int = Field(16, ge=4, le=1024)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: Seed = 0  # the student's train/validation split (the teacher's: teacher.split_seed)
    num_workers: int = Field(0, ge=0)
    augment: bool = False
    crop_padding: int = Field(2, ge=0)


class AttackConfig(_Strict):
    """Training-time L-inf PGD budget (also the teacher's)."""

    eps: Budget = parse_budget("32/255")
    step_size: Budget = Field(parse_budget("8/255"), validate_default=True)
    steps: int = Field(10, ge=1)
    random_start: bool = True

    @field_validator("step_size")
    @classmethod
    def _step_within_budget(cls, v: float, info: ValidationInfo) -> float:
        eps = info.data.get("eps")  # absent when eps itself was invalid: that error is reported instead
        if eps is not None and v > eps:
            raise ValueError(f"{format_budget(v)} is larger than eps {format_budget(eps)}: a step may not exceed "
                             f"its budget")
        return v


class ScheduleConfig(_Strict):
    kind: Literal["none", "multistep", "step"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [15])
    step_every: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(m < 0 for m in v):
            raise ValueError(f"milestones are epochs and cannot be negative, got {v}")
        return v


class OptimConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    select: Literal["last", "clean", "robust"] = "last"
    pretrained: bool = False


class TeacherConfig(OptimConfig):
    model: str = "smallcnn"
    # a robust checkpoint to use instead of training one: this project's format, or a plain state_dict of
    # `model`; null: train the teacher (Madry PGD-AT)
    checkpoint: Optional[str] = None
    # what a plain state_dict's network expects as input: "dataset" (normalised with the dataset's mean and std,
    # as this project's models), "none" ([0, 1] images as they are) or "imagenet" (ImageNet mean and std)
    input_normalization: Literal["dataset", "none", "imagenet"] = "dataset"
    seed: Seed = 0  # separate from the student's seed: a seed grid must not retrain the teacher
    split_seed: Seed = 0  # the teacher's own train/validation split, so that a student's split can vary alone
    select: Literal["last", "clean", "robust"] = "robust"


class StudentConfig(OptimConfig):
    """The student's optimiser, plus one section per strategy (`train.fat`, `train.part`, ...).

    Those sections are only checked to be mappings here: each strategy declares and validates its own
    parameters (`pipeline.strategies`, when the train stage builds the strategy), because loading a config
    must not import training code.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    __pydantic_extra__: dict[str, dict[str, Any]] = Field(init=False)  # a key that is no mapping: unknown
    # the authors' code keeps the epoch of best validation clean accuracy (Temp_CVPR train_model.py)
    select: Literal["last", "clean", "robust"] = "clean"

    def strategy_sections(self) -> dict[str, dict[str, Any]]:
        return dict(self.__pydantic_extra__ or {})


class SalienceConfig(_Strict):
    fraction: float = Field(0.5, gt=0.0, le=1.0)
    target: Literal["label", "predicted"] = "label"
    batch_size: int = Field(256, ge=1)
    chunk_size: int = Field(256, ge=1)


class CocoConfig(_Strict):
    """Human masks from a COCO instances file instead of mask files."""

    file: str = Field(min_length=1)  # relative to data.root (it may not lead outside it)
    categories: list[str] = Field(default_factory=list)  # union of these categories' instances; empty: all


class HumanMaskConfig(_Strict):
    # salient where segmentation / 255 >= threshold, an absolute level as in the authors' code
    # (Temp_CVPR train_model.py thresholds the [0, 1] map at 0.5)
    threshold: float = Field(0.5, gt=0.0, le=1.0)
    missing: Literal["error", "empty"] = "error"  # an image without a mask: stop, naming it, or an empty mask
    coco: Optional[CocoConfig] = None  # null: the dataset's mask files (CUB segmentations/, a folder's masks/)


class EvalConfig(_Strict):
    eps: list[Budget] = Field(default_factory=lambda: [parse_budget(f"{k}/255") for k in (4, 8, 16, 32)])
    # evaluated test points, a fixed seeded subset (None: the whole split). 180 is the embedded default's: half of
    # its 359 test digits, two chunks of 90, one per worker, so that `make repro` takes minutes on 2 cores
    n_examples: Optional[int] = Field(180, ge=1)
    batch_size: int = Field(500, ge=1)  # forward passes (clean accuracy, re-check of adversarial points)
    # Points per chunk: the unit of work, resumption and seeding, and AutoAttack's batch. Results depend on it
    # (not on `workers`); larger chunks waste less time per query, smaller ones share out more evenly.
    chunk_size: int = Field(90, ge=1)
    workers: int = Field(2, ge=1)  # local worker processes (ignored under torchrun, whose ranks are the workers)
    threads_per_worker: Optional[int] = Field(1, ge=1)  # torch threads per worker; None: cores / workers
    # budgets for the teacher's evaluation (its training budget). Always a list of its own (conf/ writes
    # `${evaluate.eps}` for "every budget of eps"): each evaluation stage declares only its own key, so that a
    # change of `eps` does not rerun the teacher's evaluation, nor `teacher_eps` the student's.
    teacher_eps: list[Budget] = Field(default_factory=lambda: [parse_budget("32/255")])
    ladder: bool = False
    seed: Seed = 0  # picks the evaluated subset and seeds AutoAttack (seed_scope split/all: the run's seed)

    @field_validator("teacher_eps", mode="before")
    @classmethod
    def _teacher_list(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("null is not accepted: list the teacher's budgets (the same list as evaluate.eps for "
                             "every budget; in conf/: ${evaluate.eps})")
        return v

    @field_validator("eps", "teacher_eps")
    @classmethod
    def _nonempty_sorted(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one budget is needed")
        if list(v) != sorted(set(v)):
            # one spelling per evaluation: DVC compares the list as written, so a reordered list would rerun
            # an evaluation whose metrics come out the same
            raise ValueError("list each budget once, in increasing order (e.g. [4/255, 8/255])")
        return list(v)


class PerfConfig(_Strict):
    """GPU fast paths; "auto" turns each on when CUDA is used. None of them changes what is computed."""

    amp: Literal["auto", "off", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    resume: bool = True  # keep a per-epoch state next to the checkpoint and resume from it after an interruption

    def autocast(self, cuda: bool) -> Optional[str]:
        """The autocast dtype of training and its attacks ("bfloat16"), or None for fp32."""
        return "bfloat16" if self.amp == "bf16" or (self.amp == "auto" and cuda) else None

    def use_channels_last(self, cuda: bool) -> bool:
        return self.channels_last == "on" or (self.channels_last == "auto" and cuda)


def _survey_budget(value: Any) -> float:
    eps = parse_budget(value)
    k = round(eps * 255)
    if abs(k - eps * 255) > 1e-6:
        raise ValueError(f"{value!r} is not a multiple of 1/255: 8-bit images can only hold perturbations k/255")
    if k < 1:
        raise ValueError("survey budgets must be at least 1/255 (the unperturbed image is always shown)")
    if k > 255:
        raise ValueError(f"{value!r} is above 1 (255/255): images are in [0, 1]")
    return k / 255.0


class SurveyConfig(_Strict):
    """Human attack-detection survey (paper §4.5): the image sets and the web app's protocol."""

    per_class: int = Field(5, ge=1)  # pool: distinct test images per class (seeded)
    eps: list[Annotated[float, BeforeValidator(_survey_budget)]] = Field(
        default_factory=lambda: [k / 255.0 for k in (4, 8, 16, 32)])
    attack: Literal["apgd-ce", "pgd"] = "apgd-ce"
    steps: int = Field(100, ge=1)
    seed: Seed = 0
    batch_size: int = Field(256, ge=1)
    images_per_participant: int = Field(10, ge=1)
    completion_code: Optional[str] = Field(None, min_length=1, max_length=64)
    display_px: int = Field(320, ge=16, le=2048)

    @field_validator("eps")
    @classmethod
    def _sorted_unique(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one budget is needed")
        return sorted(set(v))


class Config(_Strict):
    """A whole run. Names of datasets, models and strategies are checked against their registries by the code
    that uses them (`Registry.get(name, key)`), so that loading a config imports no training code."""

    strategy: str = "sip_s"
    dataset: str = "digits"
    model: str = "smallcnn"
    seed: Seed = 0
    # What a seed varies (conf/seed_scope/): the student alone; also its split and the evaluated points; or
    # also the teacher. The composition derives data.split_seed, teacher.seed, teacher.split_seed and
    # evaluate.seed from it; checked here so that an edited params.yaml cannot claim a scope it does not have.
    seed_scope: Literal["student", "split", "all"] = "student"
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    train: StudentConfig = Field(default_factory=StudentConfig)
    salience: SalienceConfig = Field(default_factory=SalienceConfig)
    human_masks: HumanMaskConfig = Field(default_factory=HumanMaskConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    perf: PerfConfig = Field(default_factory=PerfConfig)
    survey: SurveyConfig = Field(default_factory=SurveyConfig)

    @model_validator(mode="after")
    def _scope_holds(self) -> "Config":
        follows = {"split": ("data.split_seed", "evaluate.seed"),
                   "all": ("data.split_seed", "evaluate.seed", "teacher.seed", "teacher.split_seed")}
        wrong = [k for k in follows.get(self.seed_scope, ())
                 if getattr(getattr(self, k.split(".")[0]), k.split(".")[1]) != self.seed]
        if wrong:
            raise ValueError(f"seed_scope {self.seed_scope!r} makes {', '.join(wrong)} equal to seed ({self.seed}); "
                             f"here they are not (compose with -S seed_scope={self.seed_scope} -S seed=N, or set them)")
        return self


def _unknown_train_key(loc: tuple, kind: str) -> bool:
    """`train.<key>` that is neither an optimiser key nor a mapping (a strategy section): a misspelt key."""
    return kind == "dict_type" and len(loc) == 2 and loc[0] == "train" and loc[1] not in StudentConfig.model_fields


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" or _unknown_train_key(e["loc"], e["type"]):
            msg = "unknown key (check the spelling; see params.yaml for the accepted keys)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(raw or {}, str(path))
