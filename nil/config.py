"""The training configuration: one typed dataclass, filled by the CLI, saved with every run."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args

from nil.errors import NilError

# The vocabulary of a run: every option that takes one of a fixed set of values. The modules that
# implement them (models, losses, metrics, data readers) and the command line take their lists from here.
Model = Literal["small_cnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0"]
Format = Literal["medmnist", "folder", "csv", "zarr"]
OnBadImage = Literal["fail", "skip"]
Schedule = Literal["cosine", "step"]
Loss = Literal["ce", "nil", "ce-replay"]
Variant = Literal["margin", "triplet"]
Distractor = Literal["auto", "memory", "gradient"]
Ann = Literal["none", "exact", "faiss"]
Metric = Literal["accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk"]
Precision = Literal["auto", "fp32", "bf16"]
Split = Literal["train", "val", "test"]
Normalize = Literal["auto", "data", "imagenet", "half"]
Log = Literal["csv", "tensorboard", "none"]
TermWeighting = Literal["none", "balanced"]
TermSpace = Literal["z", "features"]

MODELS, FORMATS, ON_BAD_IMAGE, SCHEDULES = get_args(Model), get_args(Format), get_args(OnBadImage), get_args(Schedule)
LOSSES, VARIANTS, DISTRACTORS, ANNS = get_args(Loss), get_args(Variant), get_args(Distractor), get_args(Ann)
METRICS, PRECISIONS, SPLITS = get_args(Metric), get_args(Precision), get_args(Split)
NORMALIZES, LOGS, TERM_WEIGHTINGS = get_args(Normalize), get_args(Log), get_args(TermWeighting)
TERM_SPACES = get_args(TermSpace)


# The margin each distractor source was chosen with on validation (benchmarks/results/study-choice.json,
# all at lambda 0.3): nil-gradient 1.0; nil-fresh (a memory names the distractor, re-embedded) 1.0, re-tuned
# after the BatchNorm fix of 0bc7139; nil-stored (the stored vector) 1.4.
DEFAULT_MARGIN = {"gradient": 1.0, "fresh": 1.0, "stored": 1.4}

OPTION_OF_FIELD = {"lam": "lambda", "ann_params": "ann_param"}  # fields whose `nil train` option has another name
NOT_OPTIONS = ("evaluate_test",)  # set by library callers (the study), not by `nil train`


@dataclass
class TrainConfig:
    # data
    data: str = ""  # path to a .npz, image folder, CSV manifest or zarr store
    format: Format | None = None  # force a reader (medmnist|folder|csv|zarr); None detects
    csv_path_col: str | None = None  # CSV: column holding image paths
    csv_label_col: str | None = None  # CSV: column holding the class label
    csv_label_cols: list[str] | None = None  # CSV: one-hot label columns (ISIC style)
    image_root: str | None = None  # CSV: folder the image paths are relative to
    image_suffix: str | None = None  # CSV: suffix appended to extension-less paths
    val_fraction: float = 0.1  # seeded stratified split, where the data has no splits of its own
    test_fraction: float = 0.2
    image_size: int | None = None  # None: the data's own size (224 for image files of mixed size)
    on_bad_image: OnBadImage = "fail"  # image files are decoded once before training; fail: name the first bad one; skip: leave them out
    # model
    model: Model = "resnet18"  # or timm:NAME, a backbone from timm's zoo (the nil[timm] extra)
    embed_dim: int = 128  # width of the L2-normalised embedding z
    weights: str | None = None  # local state dict to start from; nothing is downloaded
    pretrained: bool = False  # start from the backbone's published ImageNet weights (torchvision's cache)
    normalize: Normalize = "auto"  # input mean/std: auto is imagenet with --pretrained, else data (the training split's own)
    # optimisation
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3  # AdamW
    schedule: Schedule = "step"  # step: x0.1 at 50% and 75% of the steps (the study's recipe); cosine: decay to 0
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 1.0  # the backbone learns at lr x this (fine-tuning: 0.1); the heads at lr
    freeze_stem_epochs: int = 0  # the stem (first convolution and its norm) is not updated for this many epochs
    # distractor-aware loss
    loss: Loss = "nil"  # ce: cross-entropy only; nil: CE + lambda * distractor term; ce-replay: CE + lambda * CE of the distractor images
    lam: float = 0.3  # weight lambda of the distractor term (ce-replay: of the replayed images' CE)
    margin: float | None = None  # distance below which a distractor is pushed away (unit sphere: distances in [0, 2]); None: DEFAULT_MARGIN of the source
    variant: Variant = "margin"  # margin | triplet
    warmup_epochs: int = 0  # epochs of CE only before the distractor term starts
    replay: float = 0.0  # --loss nil with a memory: weight of the mined distractor images' own CE beside the term (0: off)
    term_weighting: TermWeighting = "none"  # balanced: each sample's term x N / (C * n_class) of its training class
    term_space: TermSpace = "z"  # where the term (and a memory) measures distances: z, or the L2-normalised pooled features the classifier reads
    distractor: Distractor = "auto"  # memory: nearest stored other-class sample; gradient: from the neurons; auto: memory when something needs one (--ann exact|faiss, ce-replay, triplet, --index-from), else gradient
    gradient_step: float = 0.5  # --distractor gradient: step along the confusing class's gradient, x ||f||
    fresh_distractors: bool = True  # re-embed each mined distractor image with the current network (stored: collapses)
    # distractor search
    ann: Ann = "none"  # where a memory distractor is searched: none: within the batch; exact: torch engine; faiss: FAISS engine
    ann_index: str = "auto"  # kind for --ann faiss; auto: the engine's default for the device
    refresh_every: int = 200  # steps between rebuilds of the approximate structure
    ann_nprobe: int | None = None  # --ann faiss: lists probed per query (None: the engine's default for the kind)
    ann_rerank: int | None = None  # --ann faiss: candidates re-ranked exactly per query (None: ivfpq calibrates it at each build)
    ann_params: dict = field(default_factory=dict)  # more parameters of the memory's index (e.g. store_dtype, nlist)
    audit_every: int = 200  # --ann faiss: steps between recall@1 audits of 32 queries against exact search (0: never)
    index_from: str | None = None  # start the memory from an index folder built by `nil index build`
    # run
    out: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    workers: int | None = None  # data loader workers; None: 0 on CPU, 4 on CUDA
    select_metric: Metric = "balanced_accuracy"  # validation metric that picks best.pt
    checkpoint_every: int = 0  # optimiser steps between resumable last.pt writes inside an epoch (0: epoch ends only)
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32 | bf16 force it
    evaluate_test: bool = True  # False for tuning runs: the test split is never read
    log: Log = "csv"  # besides metrics.jsonl: csv writes metrics.csv; tensorboard writes event files (the tensorboard extra)
    progress: bool = True

    def __post_init__(self) -> None:
        """Resolve the automatic choices, so config.json records what the run does. The defaults are the
        study's validation choice (benchmarks/results/study.md): the gradient distractor, lambda 0.3,
        margin 1.0; asking for a memory (``--ann exact|faiss``) gives nil-fresh's margin 1.0, and
        ``--stored-distractors`` nil-stored's 1.4."""
        if self.distractor == "auto":
            needs_memory = (self.ann != "none" or self.loss == "ce-replay" or self.variant == "triplet"
                            or self.index_from is not None)
            self.distractor = "memory" if needs_memory else "gradient"
        if self.margin is None:
            source = "gradient" if self.distractor == "gradient" else "fresh" if self.fresh_distractors else "stored"
            self.margin = DEFAULT_MARGIN[source]

    def validate(self) -> None:
        """Refuse inconsistent options with one clear sentence."""
        if not self.data:
            raise NilError("--data is required")
        if not self.out:
            raise NilError("--out is required")
        for name, choices in self.choices().items():  # every fixed-set option, from its Literal type
            value = getattr(self, name)
            if value is not None and value not in choices and not (name == "model" and value.startswith("timm:")):
                raise NilError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 2, "--batch-size must be at least 2"),
            (self.lr > 0, "--lr must be positive"),
            (self.lam >= 0, "--lambda must be non-negative"),
            (self.margin > 0, "--margin must be positive"),
            (self.index_from is None or self.ann != "none", "--index-from needs --ann exact or --ann faiss"),
            (self.gradient_step > 0, "--gradient-step must be positive"),
            (self.distractor != "gradient" or self.ann == "none" or self.loss == "ce",
             "--distractor gradient builds each distractor from the network and searches no memory: drop --ann "
             "(or pass --ann none), or use --distractor memory"),
            (self.loss != "ce-replay" or self.distractor == "memory",
             "--loss ce-replay replays mined distractor images and needs --distractor memory"),
            (self.variant != "triplet" or self.distractor == "memory",
             "--variant triplet needs a stored positive, so --distractor memory"),
            (self.index_from is None or self.loss != "ce-replay",
             "--loss ce-replay searches pooled features, and an index from `nil index build` holds embeddings z; "
             "drop --index-from"),
            (self.index_from is None or self.distractor == "memory",
             "--index-from starts a distractor memory and needs --distractor memory"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be non-negative"),
            (self.replay >= 0, "--replay must be non-negative"),
            (self.replay == 0 or (self.loss == "nil" and self.distractor == "memory"),
             "--replay adds the mined distractor images' own CE to the distractor term: it needs --loss nil and "
             "--distractor memory (--loss ce-replay is replay alone, weighted by --lambda)"),
            (self.replay == 0 or self.fresh_distractors,
             "--replay embeds each distractor image in the step, so the term uses that fresh embedding: drop "
             "--stored-distractors"),
            (self.term_weighting == "none" or self.loss == "nil",
             "--term-weighting weights the distractor term: it needs --loss nil"),
            (self.term_space == "z" or self.loss == "nil",
             "--term-space says where the distractor term measures distances: it needs --loss nil"),
            (self.term_space == "z" or self.index_from is None,
             "--term-space features measures pooled features, and an index from `nil index build` holds embeddings "
             "z; drop --index-from"),
            (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
             and self.val_fraction + self.test_fraction < 1, "split fractions must lie in [0, 1) and sum below 1"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "--device must be auto, cpu or cuda"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be non-negative"),
            (self.ann_nprobe is None or self.ann_nprobe >= 1, "--ann-nprobe must be at least 1"),
            (self.ann_rerank is None or self.ann_rerank >= 1, "--ann-rerank must be at least 1"),
            ((self.ann_nprobe is None and self.ann_rerank is None) or self.ann == "faiss",
             "--ann-nprobe and --ann-rerank tune the FAISS search: they need --ann faiss"),
            (isinstance(self.ann_params, dict), "--ann-param takes NAME=VALUE pairs"),
            (not self.ann_params or self.ann != "none",
             "--ann-param sets the distractor memory's index: it needs --ann exact or --ann faiss"),
            (not self.ann_params or self.index_from is None,
             "--ann-param configures a new memory and --index-from loads one with its own parameters: drop one"),
            (not ({"nprobe", "rerank"} & set(self.ann_params or ()))
             or (self.ann_nprobe is None and self.ann_rerank is None),
             "give nprobe and rerank once: either --ann-nprobe/--ann-rerank or --ann-param"),
            (self.backbone_lr_scale > 0, "--backbone-lr-scale must be positive"),
            (0 <= self.freeze_stem_epochs < self.epochs, "--freeze-stem-epochs must lie in [0, --epochs)"),
            (not (self.pretrained and self.weights), "--pretrained and --weights both choose the starting weights; "
             "drop one"),
            (not (self.pretrained and self.model == "small_cnn"), "--pretrained needs a torchvision backbone; "
             "small_cnn has no published weights"),
        ]
        for ok, message in checks:
            if not ok:
                raise NilError(message)

    @classmethod
    def choices(cls) -> dict[str, tuple[str, ...]]:
        """The allowed values of every field typed with a Literal (None allowed where the type says so)."""
        out = {}
        for name, hint in typing.get_type_hints(cls).items():
            literal = hint if typing.get_origin(hint) is Literal else next(
                (a for a in get_args(hint) if typing.get_origin(a) is Literal), None)  # Literal[...] | None
            if literal is not None:
                out[name] = get_args(literal)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def index_params(self) -> dict:
        """The parameters of the memory's index: ``--ann-param`` with ``--ann-nprobe`` and ``--ann-rerank``."""
        given = (("nprobe", self.ann_nprobe), ("rerank", self.ann_rerank))
        return {**self.ann_params, **{k: v for k, v in given if v is not None}}

    def to_options(self) -> dict:
        """The configuration as `nil train` options (long names without dashes in front), the content of
        RUN_DIR/config.yaml: ``nil train --config RUN_DIR/config.yaml --out NEW`` repeats the run."""
        return {OPTION_OF_FIELD.get(k, k).replace("_", "-"): v for k, v in self.to_dict().items()
                if k not in NOT_OPTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
