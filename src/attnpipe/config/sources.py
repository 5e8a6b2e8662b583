"""`source`: where a pipeline's images come from, one section type per `kind`."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from attnpipe.config.base import Strict


class SklearnDigitsSource(Strict):
    """scikit-learn's bundled handwritten digits, written as a Kaggle-style folder."""

    kind: Literal["sklearn-digits"]
    image_size: int = Field(32, ge=8, description="side of the square RGB PNGs written")


class KaggleCompetitionSource(Strict):
    """A Kaggle competition's data files, through the official `kaggle` client.

    Needs Kaggle credentials and an account that accepted the competition's rules.
    """

    kind: Literal["kaggle-competition"]
    competition: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="the name in the URL")
    layout: Literal["cassava", "imagenet"] = Field(
        "cassava",
        description="cassava: train.csv + train_images/; imagenet: the ILSVRC CLS-LOC files of "
        "imagenet-object-localization-challenge (its validation images are the test split)",
    )
    include: tuple[str, ...] = Field(
        (),
        description="glob patterns of the archive members to extract (none: all); the rest "
        "is never written to disk",
    )
    exclude: tuple[str, ...] = Field(
        (), description="glob patterns of archive members not to extract (e.g. train_tfrecords/*)"
    )


class KaggleDatasetSource(Strict):
    """A Kaggle dataset (`owner/slug`), through the official `kaggle` client."""

    kind: Literal["kaggle-dataset"]
    dataset: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/slug")
    layout: Literal["melanoma"] = "melanoma"
    include: tuple[str, ...] = Field(
        (), description="glob patterns of the archive members to extract (none: all)"
    )
    exclude: tuple[str, ...] = Field(
        (), description="glob patterns of archive members not to extract"
    )


class TorchvisionSource(Strict):
    """A torchvision dataset, downloaded by torchvision and converted to the CSV layout."""

    kind: Literal["torchvision"]
    dataset: Literal["CIFAR10", "CIFAR100", "FGVCAircraft"]
    download_dir: str | None = Field(
        None, description="where torchvision keeps the archive; default ~/.cache/attnpipe"
    )
    annotation_level: Literal["variant", "family", "manufacturer"] = Field(
        "variant", description="FGVCAircraft only: the label granularity"
    )
    remove_banner: bool = Field(
        True, description="FGVCAircraft only: crop the 20-pixel copyright banner at the bottom"
    )


class FolderSource(Strict):
    """A user's image tree: class-per-folder, or a flat folder plus a labels CSV.

    `fetch` copies it into `data/<name>/raw/` so that DVC versions a snapshot.
    """

    kind: Literal["folder"]
    path: str = Field(description="the image folder (relative to the project root or absolute)")
    labels_csv: str | None = Field(None, description="without it: one sub-folder per class")
    id_column: str = "image_id"
    label_column: str = "label"
    group_column: str | None = Field(None, description="e.g. a patient id: kept in one split")
    image_suffix: str = Field("", description="appended to ids that lack the file extension")


Source = Annotated[
    SklearnDigitsSource
    | KaggleCompetitionSource
    | KaggleDatasetSource
    | TorchvisionSource
    | FolderSource,
    Field(discriminator="kind"),
]
# kind -> its section's type: the members of the union above (attnpipe.data.source_kinds
# adds how each kind is fetched and read).
SOURCE_CONFIGS: dict[str, type[Strict]] = {
    member.model_fields["kind"].annotation.__args__[0]: member
    for member in get_args(get_args(Source)[0])
}
