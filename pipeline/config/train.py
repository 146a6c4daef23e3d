"""Configuration of the training stage (pydantic models only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.network import NetworkConfig
from pipeline.config.synthetic import SyntheticVolume


class Region(BaseModel):
    """A box of a volume given as half-open index ranges in voxels; None means the whole axis."""

    model_config = ConfigDict(extra="forbid")

    z: tuple[int, int] | None = Field(None, description="[start, stop) of z in voxels.")
    y: tuple[int, int] | None = Field(None, description="[start, stop) of y in voxels.")
    x: tuple[int, int] | None = Field(None, description="[start, stop) of x in voxels.")

    @model_validator(mode="after")
    def _check_ranges(self) -> Region:
        for name in ("z", "y", "x"):
            rng = getattr(self, name)
            if rng is not None and not 0 <= rng[0] < rng[1]:
                raise ValueError(f"{name} range must satisfy 0 <= start < stop, got {list(rng)}")
        return self


class VolumeSource(BaseModel):
    """One raw volume with its label volume and the regions used for training and validation."""

    model_config = ConfigDict(extra="forbid")

    raw: str = Field(description="URL or local path of the raw EM volume (uint8, z y x).")
    label: str = Field(
        description="URL or local path of the label volume; any value > 0 (other than ignore_label) is mitochondrion."
    )
    ignore_label: int | None = Field(
        None,
        ge=1,
        description="Label value of voxels nobody annotated (e.g. 255, for a few labelled slices or boxes): losses, "
        "patch sampling and validation skip them. None = every voxel is annotated.",
    )
    annotated_mask: str | None = Field(
        None,
        description="URL or local path of a volume of the label's shape whose voxels > 0 are annotated; the rest are "
        "skipped as with ignore_label. None = no mask.",
    )
    train: Region | None = Field(default_factory=Region, description="Region trained on; None = not used.")
    validation: Region | None = Field(None, description="Held-out region for validation; None = none.")
    synthetic: SyntheticVolume | None = Field(
        None, description="If set and the volumes are absent, generate them: the EM image at raw, its mask at label."
    )

    @model_validator(mode="after")
    def _labels_go_to_label(self) -> VolumeSource:
        if self.synthetic is not None and self.synthetic.truth is not None:
            raise ValueError("synthetic.truth is for segment jobs: a training volume's labels are written to `label`")
        if self.synthetic is not None and self.synthetic.labelled_slices is not None and self.ignore_label is None:
            raise ValueError("synthetic.labelled_slices needs ignore_label: the value of unlabelled voxels")
        return self


class DataConfig(BaseModel):
    """Training and validation data."""

    model_config = ConfigDict(extra="forbid")

    volumes: list[VolumeSource] = Field(min_length=1, description="Volumes to train and validate on.")
    split_name: str = Field("custom", description="Name of the train/validation split, reported with scores.")
    patch_shape: tuple[int, int, int] = Field((16, 160, 160), description="Training patch (z, y, x) in voxels.")
    batch_size: int = Field(1, ge=1, description="Patches per step per process.")
    foreground_oversample: float = Field(
        0.5, ge=0, le=1, description="Probability that a patch is centred on a random foreground voxel."
    )
    border_overhang: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Fraction of the patch shape by which a patch may reach past its region's borders, the part "
        "outside mirrored as inference pads volume borders: the network then learns objects cut by a volume "
        "border (0 = patches stay inside).",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="Processes that make batches ahead of the training step (0 = in the training process). The "
        "batches are the same whatever the number; on a GPU augmentation is slower than the step, so use several.",
    )


class AugmentConfig(BaseModel):
    """Probabilities and strengths of the training augmentations."""

    model_config = ConfigDict(extra="forbid")

    flip: bool = Field(True, description="Random flips along z, y and x.")
    rot90: bool = Field(True, description="Random 90-degree rotations in the y-x plane.")
    intensity: float = Field(0.5, ge=0, le=1, description="Probability of brightness/contrast/gamma jitter.")
    intensity_strength: float = Field(0.15, ge=0, description="Relative amplitude of the intensity jitter.")
    elastic: float = Field(0.2, ge=0, le=1, description="Probability of an in-plane elastic deformation.")
    elastic_sigma: float = Field(8.0, gt=0, description="Smoothness of the elastic field in voxels.")
    elastic_alpha: float = Field(4.0, ge=0, description="Peak displacement of the elastic field in voxels.")
    missing_section: float = Field(0.1, ge=0, le=1, description="Probability that one z-slice is blanked.")
    misalignment: float = Field(0.1, ge=0, le=1, description="Probability of shifting slices from a random z.")
    misalignment_max: int = Field(6, ge=0, description="Largest misalignment shift in voxels.")
    blur: float = Field(0.1, ge=0, le=1, description="Probability of an in-plane Gaussian blur.")


class SamplingConfig(BaseModel):
    """Point sampling for the contrastive loss (training only)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["uncertainty", "misclassified", "random"] = Field(
        "uncertainty", description="Hard examples by |p-0.5|, by misclassification, or uniform at random."
    )
    num_points: int = Field(1024, ge=2, description="Points per patch, spread evenly over its z-slices.")
    oversample: int = Field(3, ge=1, description="k: candidates drawn per kept point (uncertainty mode).")
    importance: float = Field(0.75, ge=0, le=1, description="beta: fraction of points chosen as hardest.")


class LossConfig(BaseModel):
    """Segmentation and contrastive loss terms."""

    model_config = ConfigDict(extra="forbid")

    dice_weight: float = Field(0.5, ge=0, description="Weight of soft Dice added to weighted BCE per head.")
    class_balance: float = Field(
        1.0, ge=0, le=1, description="Exponent of the inverse-frequency BCE weights (0 = none, 1 = full)."
    )
    contour_weight: float = Field(1.0, ge=0, description="Weight of the contour head's loss.")
    contour_width: int = Field(1, ge=1, description="Half-width in voxels of contour targets (in-plane).")
    lambda_sim: float = Field(0.1, ge=0, description="Weight of the similarity (SupCon) term.")
    lambda_con: float = Field(0.1, ge=0, description="Weight of the frame-to-frame consistency term.")
    temperature: float = Field(0.1, gt=0, description="Temperature of both contrastive terms.")
    contrastive_warmup: int = Field(
        500, ge=0, description="Iterations over which the contrastive weights ramp from 0 to lambda."
    )
    max_points: int = Field(4096, ge=2, description="Cap on sampled points per step (memory bound).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Point sampling settings.")


class OptimConfig(BaseModel):
    """Optimiser and learning-rate schedule."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimiser.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    warmup_iterations: int = Field(100, ge=0, description="Linear warm-up iterations.")
    iterations: int = Field(2000, ge=1, description="Total iterations of the schedule.")
    time_budget_minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget in minutes: the cosine decay and the run end at whichever of "
        "`iterations` or the budget comes first (for shared CPUs; None = iterations only).",
    )
    grad_clip: float = Field(5.0, ge=0, description="Gradient-norm clip (0 = none).")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights and batch-norm statistics with this decay "
        "(e.g. 0.999, a window of about 1/(1 - decay) iterations); validation, the best checkpoint and the "
        "shipped weights use the average, which smooths the step-to-step swing. None = off.",
    )


class TrainConfig(BaseModel):
    """A whole training job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("run", description="Run name, recorded in checkpoints.")
    output_dir: str = Field("runs/run", description="Folder for checkpoints and logs (relative to the cwd).")
    seed: int = Field(0, description="Seed of every random generator (rank is added per process).")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per process (0 = torch default).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where to train: auto = each process's GPU when CUDA is present, else the CPU (gloo). CPU "
        "runs are bitwise reproducible; GPU runs only up to the non-determinism of CUDA kernels.",
    )
    mixed_precision: bool = Field(True, description="bf16 autocast on a GPU; always off on CPU.")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="The network to train.")
    init_from: str | None = Field(
        None,
        description="Checkpoint (path or shipped name, e.g. lucchi) whose weights start a fresh schedule "
        "(fine-tuning; without a `network` section its network is used); not used by --resume.",
    )
    data: DataConfig = Field(description="Training and validation data.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentations.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss terms.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    log_every: int = Field(10, ge=1, description="Iterations between metric log lines.")
    checkpoint_every: int = Field(100, ge=1, description="Iterations between checkpoints.")
    snapshot_every: int | None = Field(
        None,
        ge=1,
        description="Also keep a checkpoint every this many iterations as step_NNNNNNN.pt (to validate or average "
        "them elsewhere, e.g. when the training machine holds no validation data). None = only last and best.",
    )
    val_every: int = Field(200, ge=1, description="Iterations between validations.")
    val_patch_shape: tuple[int, int, int] = Field(
        (16, 256, 256), description="Inference patch (z, y, x) for validation, stored in the checkpoint."
    )
    val_overlap: float = Field(0.25, ge=0, lt=1, description="Fractional overlap of validation patches.")

    @model_validator(mode="after")
    def _check_shapes(self) -> TrainConfig:
        if self.init_from is not None and "network" not in self.model_fields_set:
            return self  # the network is init_from's: checked when the run reads it (pipeline.training.finetune)
        div = self.network.size_divisor()
        for name, shape in (("data.patch_shape", self.data.patch_shape), ("val_patch_shape", self.val_patch_shape)):
            bad = [s for s, d in zip(shape, div, strict=True) if s % d]
            if bad:
                raise ValueError(f"{name} {list(shape)} must be divisible by the network's size divisor {list(div)}")
        ctx = self.network.context
        if any(2 * c >= s for c, s in zip(ctx, self.val_patch_shape, strict=True)):
            raise ValueError(f"val_patch_shape {list(self.val_patch_shape)} must exceed twice the context {list(ctx)}")
        return self
