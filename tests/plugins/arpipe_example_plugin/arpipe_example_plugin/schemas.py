"""The plugin's config models, which its entry points name: cheap to import (pydantic and arpipe.schemas),
so that ``arpipe validate`` and ``arpipe schema`` load them without torch. Each model's ``implementation``
is imported only when it is used."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from arpipe.schemas.base import Resources, StageBase
from arpipe.schemas.tokenize import SourceBase, TokenizerBase


class TokenStatsStage(StageBase):
    """Counts how often each token id occurs in a token store; output ``stats`` (a JSON file)."""

    implementation: ClassVar[str] = "arpipe_example_plugin.token_stats:TokenStatsStage"
    output_names: ClassVar[tuple[str, ...]] = ("stats",)

    kind: Literal["token_stats"]
    store: str = Field(description="A token store, usually `${tokenize.store}`.")
    top: int = Field(20, ge=1, description="How many of the most frequent ids to list.")
    resources: Resources = Field(default_factory=Resources)


class LevelsConfig(TokenizerBase):
    """One token per pixel of a single-channel sample: its value quantized to ``levels`` bins."""

    implementation: ClassVar[str] = "arpipe_example_plugin.levels:LevelTokenizer"

    type: Literal["levels"]
    levels: int = Field(16, ge=2, description="Bins per pixel value: the vocabulary size.")


class DepthSource(SourceBase):
    """Depth maps: single-channel 16-bit PNG files below a folder."""

    implementation: ClassVar[str] = "arpipe_example_plugin.depth:DepthReader"

    modality: Literal["depth"]
    max_depth: float = Field(65535.0, gt=0, description="The depth stored as 1.0.")
    labels: str | None = Field("folder", description="'folder' (the parent folder's name) or null.")
