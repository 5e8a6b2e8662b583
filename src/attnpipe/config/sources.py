"""`source`: where a pipeline's images come from, one section type per `kind`."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from attnpipe.config.base import Strict


class SklearnDigitsSource(Strict):
    """scikit-learn's bundled handwritten digits, written as a Kaggle-style folder."""

    kind: Literal["sklearn-digits"] = Field(description="selects this source type")
    image_size: int = Field(
        32,
        ge=8,
        description="side of the square RGB PNGs written, in pixels (the 8x8 digits are "
        "enlarged bicubically); changing it fetches the data again",
    )


class KaggleCompetitionSource(Strict):
    """A Kaggle competition's data files, through the official `kaggle` client.

    Needs Kaggle credentials and an account that accepted the competition's rules.
    """

    kind: Literal["kaggle-competition"] = Field(description="selects this source type")
    competition: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="the competition's name as in its URL (kaggle.com/competitions/<name>)",
    )
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

    kind: Literal["kaggle-dataset"] = Field(description="selects this source type")
    dataset: str = Field(
        pattern=r"^[\w.-]+/[\w.-]+$",
        description="the dataset as owner/slug, as in its URL (kaggle.com/datasets/owner/slug)",
    )
    layout: Literal["melanoma"] = Field(
        "melanoma",
        description="how the files are read: melanoma: marking.csv (target, patient_id: a "
        "patient's images stay in one split) + the images",
    )
    include: tuple[str, ...] = Field(
        (), description="glob patterns of the archive members to extract (none: all)"
    )
    exclude: tuple[str, ...] = Field(
        (), description="glob patterns of archive members not to extract (applied after include)"
    )


class TorchvisionSource(Strict):
    """A torchvision dataset, downloaded by torchvision and converted to the CSV layout."""

    kind: Literal["torchvision"] = Field(description="selects this source type")
    dataset: Literal["CIFAR10", "CIFAR100", "FGVCAircraft"] = Field(
        description="which dataset; each carries its official test split (prepare.test_split)"
    )
    download_dir: str | None = Field(
        None,
        description="where torchvision keeps the downloaded archive (default ~/.cache/attnpipe): "
        "point several projects at one copy; changing it does not fetch again",
    )
    annotation_level: Literal["variant", "family", "manufacturer"] = Field(
        "variant", description="FGVCAircraft only: the label granularity"
    )
    remove_banner: bool = Field(
        True, description="FGVCAircraft only: crop the 20-pixel copyright banner at the bottom"
    )


class FolderSource(Strict):
    """A user's image tree: class-per-folder, split folders of class folders, or a flat folder
    plus a labels CSV.

    `fetch` links or copies it into `data/<name>/raw/` so that DVC versions a snapshot.
    """

    kind: Literal["folder"] = Field(description="selects this source type")
    path: str = Field(description="the image folder (relative to the project root or absolute)")
    labels_csv: str | None = Field(
        None,
        description="a CSV of image ids (file paths below path) and labels; without it: one "
        "sub-folder per class, named after it",
    )
    id_column: str = Field("image_id", description="labels_csv: the column of image ids")
    label_column: str = Field("label", description="labels_csv: the column of labels")
    group_column: str | None = Field(
        None,
        description="labels_csv: a column of groups (e.g. a patient id) whose images must stay "
        "in one split; null: every image on its own",
    )
    image_suffix: str = Field(
        "", description="labels_csv: appended to each id to name its file (e.g. .jpg)"
    )
    split_column: str | None = Field(
        None,
        description="labels_csv: a column of each image's split as its owner published it "
        "(train, val/valid/validation, test, any case); kept exactly, whatever "
        "prepare.test_split says. Without labels_csv, top-level folders named so (train/<class>/, "
        "val/<class>/, test/<class>/) are such splits",
    )
    link_files: bool = Field(
        True,
        description="fetch hard-links the images into raw/ where source.path is on the same file "
        "system (no second copy of a large folder), else copies them. The files are then shared: "
        "replace an original rather than writing into it, and expect DVC's hardlink cache to "
        "make them read-only; false: always copy",
    )

    @model_validator(mode="after")
    def _split_column_needs_csv(self) -> FolderSource:
        if self.split_column and not self.labels_csv:
            raise ValueError(
                "split_column names a column of labels_csv: set labels_csv too, or drop "
                "split_column (without a CSV, top-level folders train/, val/, test/ are the splits)"
            )
        return self


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
