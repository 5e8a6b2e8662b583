"""`model` and `augment`: the network, its initialisation, and train-time augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from attnpipe.config.base import Strict


class ModelConfig(Strict):
    """The network: which registry model, its input size, weights to start from, arguments."""

    name: str = Field(description="a registry model (`attnpipe models` lists them)")
    input_size: int = Field(
        224,
        ge=8,
        description="side in pixels of the square crops the model trains on (and is evaluated "
        "and exported at, unless evaluate.image_size says otherwise); 32 for CIFAR-sized models",
    )
    pretrained: str | None = Field(
        None,
        description="imagenet: torchvision's ImageNet weights for the backbone (attnvgg16 and "
        "the ResNet family); or the path (relative to the project root) of a model.pt trained "
        "here, e.g. models/digits/model.pt, of the same model name and kwargs, from which every "
        "tensor loads but a classifier of another class count; or of a state_dict file; "
        "none: trained from scratch",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="the model's own arguments, e.g. {width_multiplier: 0.5} (checked by name: "
        "`attnpipe models` lists each model's, with defaults)",
    )

    @field_validator("pretrained")
    @classmethod
    def _none_is_none(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none") else value

    def pretrained_file(self, root: Path | None) -> Path | None:
        """The file `pretrained` names, a relative path taken from the project `root`; None for
        none and imagenet, and for a relative path when the root is not known."""
        if self.pretrained is None or self.pretrained == "imagenet":
            return None
        path = Path(self.pretrained).expanduser()
        if path.is_absolute():
            return path
        return root / path if root is not None else None


class AugmentConfig(Strict):
    """Train-time augmentation (torchvision v2). Validation and evaluation resize and
    centre-crop only, and keep integer labels.

    Per image, on uint8 in the loader's workers: the crop, flips, rotation, `auto_augment` and
    colour jitter. Per batch, on the device after normalisation (`attnpipe.data.batch_augment`):
    random erasing, then MixUp or CutMix. Everything beyond the crop and flip is off by default.
    """

    random_resized_crop_scale: tuple[float, float] = Field(
        (0.08, 1.0),
        description="the random crop's area as a fraction of the image, [min, max]; raise min "
        "(e.g. 0.35-0.75) for small images or small models",
    )
    random_resized_crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="the random crop's aspect ratio (width/height), [min, max]"
    )
    horizontal_flip: float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability of a left-right mirror; 0 where mirroring changes the class "
        "(digits, text)",
    )
    vertical_flip: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability of an upside-down flip: for images with no up (microscopy, "
        "aerial, dermoscopy)",
    )
    rotation_degrees: float = Field(
        0.0, ge=0, le=180, description="random rotation by up to +/- this many degrees; 0: off"
    )
    color_jitter: float = Field(
        0.0,
        ge=0,
        le=1,
        description="strength of random brightness, contrast and saturation changes (each by a "
        "factor in [1 - x, 1 + x]); 0: off",
    )
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none",
        description="random image operations, no policy search: randaugment "
        "(randaugment_num_ops random operations of strength randaugment_magnitude) or "
        "trivialaugment (TrivialAugmentWide: one operation of random strength, no parameters)",
    )
    randaugment_num_ops: int = Field(
        2, ge=1, description="randaugment only: operations applied to each image"
    )
    randaugment_magnitude: int = Field(
        9, ge=0, le=30, description="randaugment only: their strength, 0-30 (torchvision's bins)"
    )
    random_erasing: float = Field(
        0.0,
        ge=0,
        le=1,
        description="per-image probability of erasing a rectangle (2-33% of the area, aspect "
        "0.3-3.3, torchvision's defaults) to 0, i.e. the mean after normalisation",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="MixUp: the mixing weight ~ Beta(alpha, alpha); 0 = off (0.2-0.8)"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0, description="CutMix: the pasted area's share ~ Beta(alpha, alpha); 0 = off (1.0)"
    )
    mix_prob: float = Field(
        1.0,
        ge=0,
        le=1,
        description="with MixUp or CutMix on: the probability that a batch is mixed; with both "
        "on, a mixed batch uses one of them, chosen at random",
    )
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406),
        description="per-channel (R, G, B) mean subtracted from pixels scaled to [0, 1], in "
        "training, evaluation and the exported model; ImageNet's: keep them for pretrained "
        "weights",
    )
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225),
        description="per-channel (R, G, B) standard deviation the pixels are divided by after "
        "the mean (ImageNet's)",
    )
