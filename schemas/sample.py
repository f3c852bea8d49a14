"""Config of the ``sample`` and ``evaluate`` stages."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from arpipe.schemas.base import Resources, StageBase, Strict
from arpipe.schemas.tokenize import Source

MEDIA_FORMATS = {"image": ("png",), "video": ("gif", "mp4"), "volume": ("tiff", "mrc"), "pointcloud": ("ply",)}


class PrefixSpec(Strict):
    """Continue samples of a token store (image/video continuation, volume in-painting from the first tokens)."""

    store: str = Field(description="Token store whose samples give the prefixes, e.g. `${tokenize_val.store}`.")
    tokens: int = Field(ge=1, description="Target tokens kept from each store sample; must end a group "
                                          "(a scale for next_scale, a block for next_block).")
    samples: int | None = Field(None, ge=1, description="How many store samples to continue (default: "
                                                        "num_samples, cycling through the store).")


class InpaintSpec(Strict):
    """Complete samples of a token store: keep every token of the known region exactly, draw the rest
    (VAR's masked inference, scale by scale; in raster or block order for next_token and next_block)."""

    store: str = Field(description="Token store of the samples to complete, e.g. `${tokenize_val.store}`.")
    box: list[int] | None = Field(None, min_length=4, max_length=4,
                                  description="`[top, left, bottom, right]`: the pixel rectangle to draw "
                                              "(bottom and right exclusive); the rest is kept.")
    mask: str | None = Field(None, description="An image the size of the samples: white pixels are drawn, "
                                               "black ones kept (instead of `box`).")
    samples: int | None = Field(None, ge=1, description="How many store samples to complete (default: "
                                                        "num_samples, cycling through the store).")
    lookahead: int = Field(1, ge=1, description="Candidate draws of a group whose next group holds known tokens; "
                                                "the one that makes those known tokens likeliest is kept (1: off).")

    @model_validator(mode="after")
    def _one_region(self) -> InpaintSpec:
        if (self.box is None) == (self.mask is None):
            raise ValueError("give the region to draw as box: [top, left, bottom, right] or as mask: <image>, "
                             "one of them")
        return self


class ControlsSpec(Strict):
    """Control maps (ControlAR) that steer the samples of a model trained on a store with `control:`; each
    control map is drawn `samples_per_control` times in a row."""

    store: str | None = Field(None, description="A token store tokenized with the model's `control:`, whose "
                                                "samples' control maps are used, e.g. `${tokenize_val.store}`.")
    images: str | None = Field(None, description="A folder of control images (edge maps as the model's control "
                                                 "transform draws them), or of pictures with `transform`.")
    transform: Literal["none", "canny", "sobel"] = Field(
        "none", description="With `images`: `none` reads them as control maps; `canny`/`sobel` computes each "
                            "picture's map (use the model's own transform).")
    samples: int | None = Field(None, ge=1, description="How many control maps to use (default: all of them).")
    samples_per_control: int = Field(1, ge=1, description="Samples drawn for each control map.")

    @model_validator(mode="after")
    def _one_source(self) -> ControlsSpec:
        if (self.store is None) == (self.images is None):
            raise ValueError("give the control maps as store: <token store> or images: <folder>, one of them")
        return self


class RefinerSpec(Strict):
    """Collaborative decoding (CoDe, Chen et al., CVPR 2025) of a next_scale model: the stage's `model` (the
    large drafter) draws the first `handover` scales, a small model of the same tokens draws the rest, which
    hold most of the tokens. The refiner runs its own KV cache and its own guidance."""

    model: str = Field(description="The refiner: a model folder, usually `${train_small.model}`, or a registered "
                                   "model (`models:/NAME@alias`, `models:/NAME/VERSION`, `models:/m-<id>`), trained "
                                   "on the drafter's tokens (same tokenizer and vocabulary).")
    handover: int = Field(ge=1, description="Scales the drafter draws before the refiner takes over, e.g. 4 of "
                                            "scales [1, 2, 4, 8, 16]: the refiner draws 16 x 16 (75% of the "
                                            "tokens); at most the number of scales minus one.")
    cfg_scale: float | None = Field(None, ge=0, description="The refiner's classifier-free guidance scale "
                                                            "(default: the stage's `cfg_scale`).")
    cfg_schedule: Literal["constant", "linear"] | None = Field(
        None, description="The refiner's guidance schedule (default: the stage's `cfg_schedule`); `linear` goes "
                          "on with the drafter's ramp, its place counting every scale.")
    weights: Literal["ema", "raw"] | None = Field(
        None, description="Which of the refiner's weights draw, as the stage's `weights` (default: ema when the "
                          "refiner has EMA weights, else raw).")


class RelaxedSpec(Strict):
    """LANTERN's relaxed acceptance for `decoder: sjd` (Jang et al., ICLR 2025): a draft counts with the
    model's probability of its latent neighbourhood, for longer accepted runs at a bounded distance from plain
    sampling. `k: 1` is speculative Jacobi decoding exactly."""

    k: int = Field(ge=1, description="Codes in a draft's neighbourhood, the draft itself included: it and its "
                                     "k - 1 nearest codes in the tokenizer's codebook (the LANTERN code's "
                                     "`lantern_k` is k - 1). 1 is off.")
    delta: float = Field(ge=0, le=1, description="Probability budget: neighbours join, nearest first, while "
                                                 "their total probability stays within delta (the paper's "
                                                 "total-variation bound per drafted code; 0 is off). "
                                                 "LANTERN uses 0.05-0.4.")


class MaskedSpec(Strict):
    """MaskGIT's parallel decoding of a `masked` model (Chang et al., CVPR 2022): every step predicts all masked
    tokens, keeps the most confident and masks the rest again, fewer each step along the schedule."""

    steps: int = Field(8, ge=1, description="Forward passes per sample (MaskGIT uses 8 for 256 tokens); the last "
                                            "one fills every token still masked.")
    schedule: Literal["cosine", "linear"] = Field(
        "cosine", description="Share of the tokens still masked after step t of T: `cosine` cos(pi/2 (t+1)/T) "
                              "(MaskGIT's, as in training), `linear` 1 - (t+1)/T (one token a step when steps "
                              "equals the token count).")
    choice_temperature: float = Field(4.5, ge=0, description="Gumbel noise on the confidences that choose which "
                                                             "draws are kept, annealed linearly to 0 over the "
                                                             "steps (MaskGIT's 4.5); 0 keeps the most likely.")


class SampleStage(StageBase):
    """Draws samples from a trained model on a Ray actor pool; outputs ``samples`` (a token store) and ``media``."""

    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields | {
        "actors", "cpus_per_actor", "gpus_per_actor"}
    output_names: ClassVar[tuple[str, ...]] = ("samples", "media")

    kind: Literal["sample"]
    model: str = Field(description="A model folder, usually `${train.model}`, or a registered model "
                                   "(`models:/NAME@alias`, `models:/NAME/VERSION`, `models:/m-<id>`).")
    refiner: RefinerSpec | None = Field(
        None, description="CoDe for a next_scale model: a small model of the same tokens draws the last scales, "
                          "e.g. `{model: ${train_small.model}, handover: 4}`; `model` draws the first `handover`.")
    modalities: list[str] | None = Field(None, description="Vocabulary modalities to sample (default: all of the "
                                                           "model's), e.g. `[image]`.")
    num_samples: int = Field(64, ge=1, description="Samples per modality (when neither `classes` nor `prompts` "
                                                   "is given).")
    classes: dict[str, int] | Literal["all", "none"] | None = Field(
        None, description="Class label -> sample count; `all`: num_samples over every class in turn; `none`: "
                          "unconditional (default: `all` when the model has classes, else `none`).")
    prefix: PrefixSpec | None = Field(None, description="Continue samples of a token store instead of starting "
                                                        "from nothing (not with `classes`).")
    prompts: list[str] | str | None = Field(
        None, description="Text prompts for a model trained on captions: a list, or a `.txt` file (one prompt a "
                          "line) or `.jsonl` file (`{\"prompt\": ...}` a line). Each prompt is drawn "
                          "`samples_per_prompt` times; its text is kept with the sample (the store's caption, "
                          "a `.txt` beside each media file, the contact sheet).")
    samples_per_prompt: int = Field(1, ge=1, description="Samples drawn for each prompt.")
    controls: ControlsSpec | None = Field(None, description="Control maps for a model trained with `control:`; "
                                                            "with `prompts` too, control k goes with prompt k "
                                                            "(cycling the prompts).")
    inpaint: InpaintSpec | None = Field(None, description="Complete samples of a token store in a region (in- "
                                                          "or out-painting): known tokens are kept exactly.")
    length: int | None = Field(None, ge=1, description="Tokens per sample for variable-length tokenizers "
                                                       "(octree; default: the longest sample the model saw).")
    size: int | list[int] | None = Field(None, description="Image size to draw at (side, or [h, w]) for a model "
                                                           "whose tokenizer takes several (flexvq): one of its "
                                                           "`sizes`, seen in training or not; the scales stop at "
                                                           "that size's grid. Default: the largest.")
    temperature: float = Field(1.0, ge=0, description="0 is greedy.")
    top_k: int = Field(0, ge=0, description="0 is off (as in VAR's sampler; VAR's demo uses 900 of 4096 "
                                            "codes).")
    top_p: float = Field(1.0, gt=0, le=1, description="1 is off (VAR's demo uses 0.95).")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale s in u + s (c - u) of the "
                                                    "unconditional and conditional logits; 1 is off. VAR's "
                                                    "`cfg` value c is s = 1 + c at the last scale.")
    cfg_schedule: Literal["constant", "linear"] = Field(
        "constant", description="`linear` ramps the scale from 1 at the first group to cfg_scale at the last, "
                                "as VAR's sampler does (its t = cfg x group / (groups - 1)).")
    decoder: Literal["plain", "sjd"] = Field("plain", description="`sjd`: speculative Jacobi decoding "
                                                                  "(next_token models; same distribution).")
    sjd_window: int = Field(16, ge=1, description="Draft tokens per SJD window.")
    relaxed: RelaxedSpec | None = Field(
        None, description="With `decoder: sjd` on a model whose tokens come from a codebook (patch_vq, msvq, "
                          "vqvae): LANTERN's relaxed acceptance, e.g. `{k: 8, delta: 0.2}`; samples move "
                          "away from the model's distribution by a bounded total variation.")
    masked: MaskedSpec | None = Field(
        None, description="How a `masked` (MaskGIT) model decodes, e.g. `{steps: 12, schedule: cosine, "
                          "choice_temperature: 4.5}` (default: those of MaskedSpec, 8 steps); other paradigms "
                          "refuse it.")
    use_cache: bool = Field(True, description="KV cache (same tokens as without, far fewer FLOPs; a masked "
                                              "model's bidirectional steps run without one).")
    seed: int = Field(0, description="Sample i draws from a generator seeded by (seed, i).")
    batch_size: int = Field(16, ge=1, description="Samples decoded together by one actor.")
    samples_per_shard: int = Field(32, ge=1, description="Samples per shard: the resumable unit.")
    media: dict[str, list[Literal["png", "gif", "mp4", "tiff", "mrc", "ply"]]] | None = Field(
        None, description="Media formats per modality (default: image png, video gif+mp4, volume tiff+mrc, "
                          "pointcloud ply); `{}` writes none.")
    actors: int = Field(1, ge=1, description="Actors in the pool; each holds one model replica.")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs reserved per actor; also its torch thread count.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs reserved per actor; above 0 the model runs on "
                                                         "CUDA.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Model dtype on GPU (CPU runs fp32).")
    compile: bool = Field(False, description="torch.compile each transformer block of the actors' model "
                          "(dynamic shapes for KV-cached decoding; eager with one warning where it cannot compile).")
    weights: Literal["ema", "raw"] | None = Field(
        None, description="Which of the model's weights draw: `ema` the moving average a train stage with `ema:` "
                          "kept, `raw` the trained weights themselves (default: ema when the model has EMA "
                          "weights, else raw).")
    progress: bool = Field(True, description="Print samples done/total, samples/s, elapsed and ETA (a line per "
                                             "10 s, one updating bar on a terminal).")

    @model_validator(mode="after")
    def _media_formats(self) -> SampleStage:
        for modality, formats in (self.media or {}).items():
            allowed = MEDIA_FORMATS.get(modality)
            if allowed is None:
                raise ValueError(f"media: unknown modality {modality!r}; use one of {', '.join(MEDIA_FORMATS)}")
            bad = [f for f in formats if f not in allowed]
            if bad:
                raise ValueError(f"media.{modality}: {', '.join(bad)} cannot hold {modality}; use "
                                 f"{' or '.join(allowed)}")
        if self.prefix is not None and self.classes is not None:
            raise ValueError("give classes or prefix, not both: a prefix sample brings its own class")
        if self.controls is not None and (self.prefix is not None or self.inpaint is not None):
            raise ValueError("controls go with prompts and classes, not with prefix or inpaint")
        if self.inpaint is not None and (self.prefix is not None or self.classes is not None
                                         or self.prompts is not None):
            raise ValueError("inpaint takes each sample's class and caption from its store: give it without "
                             "prefix, classes or prompts")
        if self.masked is not None and self.decoder != "plain":
            raise ValueError("masked decoding takes its own parallel steps; speculative Jacobi decoding is for "
                             "next_token models: remove decoder: sjd, or masked")
        if self.relaxed is not None and self.decoder != "sjd":
            raise ValueError("relaxed (LANTERN) relaxes speculative Jacobi decoding's acceptance: add "
                             "decoder: sjd, or remove relaxed")
        if self.prompts is not None:
            if self.prefix is not None:
                raise ValueError("give prompts or prefix, not both: a prefix sample brings its own caption")
            if isinstance(self.prompts, list) and not self.prompts:
                raise ValueError("prompts is an empty list; give at least one prompt")
        return self

    @model_validator(mode="after")
    def _refiner_decodes_plainly(self) -> SampleStage:
        if self.refiner is not None and self.decoder != "plain":
            raise ValueError("refiner (CoDe) hands a next_scale model's last scales to a second model, one pass "
                             "per scale; speculative Jacobi decoding (decoder: sjd, with or without relaxed) is for "
                             "next_token models: use decoder: plain, or remove refiner")
        return self

    def media_formats(self, modality: str) -> tuple[str, ...]:
        if self.media is None:
            return MEDIA_FORMATS.get(modality, ())
        return tuple(self.media.get(modality, ()))


class FeaturesSpec(Strict):
    """TorchScript feature networks for distribution metrics; no package ships their weights offline."""

    image: str | None = Field(None, description="Image network (e.g. Inception-v3 pool features) saved with "
                                                "torch.jit.save: enables FID, KID, precision and recall.")
    image_size: int | None = Field(299, ge=8, description="Input side the image network expects.")
    video: str | None = Field(None, description="Video network (e.g. I3D) saved with torch.jit.save: enables FVD.")
    video_size: int | None = Field(224, ge=8, description="Frame side the video network expects.")


class ClassifierSpec(Strict):
    """Quality judges for the Classification Accuracy Score (CAS): classifiers fitted on real data check that
    each class-conditional sample shows the class it was drawn for. Files: a scikit-learn model saved with
    skops (`.skops`: loads no code; pickles such as `.joblib` and `.pkl` are refused, since unpickling runs code)
    your own) or a TorchScript network returning logits (`.pt`)."""

    image: str | None = Field(None, description="Image classifier, fitted on flattened images in [0, 1] "
                                                "(`classifier_features`), e.g. `${fit_judge.classifier}`.")
    image_size: int | None = Field(None, ge=4, description="Side images are resized to for the image classifier "
                                                           "(default: as decoded).")
    volume: str | None = Field(None, description="Volume classifier on 80 shape statistics (intensity histogram, "
                                                 "4 x 4 x 4 block means).")
    pointcloud: str | None = Field(None, description="Point-cloud classifier on 19 shape statistics (covariance "
                                                     "eigenvalues, radial-distance histogram).")

    prompt_classes: dict[str, str] | None = Field(
        None, description="For samples drawn from text prompts: class label -> the word that names it in a "
                          "prompt, e.g. `{\"7\": seven}`; a prompted sample is checked against the one class its "
                          "prompt names (samples naming none or several are skipped and counted).")

    def files(self) -> dict[str, str]:
        """modality -> classifier file, for the modalities that have one."""
        return {m: f for m, f in (("image", self.image), ("volume", self.volume),
                                  ("pointcloud", self.pointcloud)) if f}


class PromptAttribute(Strict):
    """An attribute a prompt asks for, checked on matched pairs of prompted samples: each sample whose prompt
    has `word` is paired with the sample at the same position among those of the same prompt with `opposite`
    instead, and `measure` of the two images is compared."""

    word: str = Field(min_length=1, description="The word that asks for more of the attribute, e.g. `thick` "
                                                "(a whole word of the prompt, any case).")
    opposite: str = Field(min_length=1, description="The word that asks for less, e.g. `thin`.")
    measure: Literal["ink", "slant"] = Field(
        description="What is measured on each decoded image (its luma, in [0, 1]): `ink` the total intensity, "
                    "`slant` |mu11 / mu02| of its intensity moments.")

    @model_validator(mode="after")
    def _two_words(self) -> PromptAttribute:
        if " ".join(self.word.lower().split()) == " ".join(self.opposite.lower().split()):
            raise ValueError(f"word and opposite are both {self.word!r}; give the word that asks for the "
                             "opposite, e.g. {word: thick, opposite: thin, measure: ink}")
        return self


class ReconstructionSpec(Strict):
    """Tokenizer round-trip quality on real data."""

    tokenizer: str = Field(description="A tokenizer artifact, usually `${tokenizer.tokenizer}`.")
    source: Source = Field(description="Real data, read as the tokenize stage reads it (held-out data is best).")
    max_samples: int = Field(64, ge=1, description="Samples round-tripped: the first ones the source yields.")


class EvaluateStage(StageBase):
    """Scores a model and its samples; output ``metrics`` (summary JSON, per-sample Parquet, plot)."""

    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields | {"batch_size", "actors",
                                                                           "samples_per_unit"}
    output_names: ClassVar[tuple[str, ...]] = ("metrics",)

    kind: Literal["evaluate"]
    samples: str | None = Field(None, description="Generated samples, usually `${sample.samples}`.")
    reference: str | list[str] | None = Field(
        None, description="Token store(s) of real data the samples are compared with, per modality (decoded "
                          "through their tokenizers).")
    model: str | None = Field(None, description="A model folder, for held-out NLL (`${train.model}`, or "
                                                "`models:/NAME@alias`, `models:/NAME/VERSION`).")
    heldout: str | list[str] | None = Field(None, description="Token store(s) for NLL and bits per token "
                                                              "(default: reference).")
    reconstruction: ReconstructionSpec | None = Field(
        None, description="Score a tokenizer's round trip on real data (PSNR and SSIM; Chamfer for point clouds).")
    features: FeaturesSpec = Field(default_factory=FeaturesSpec,
                                   description="Feature networks for FID, KID, precision, recall and FVD.")
    classifier: ClassifierSpec = Field(default_factory=ClassifierSpec,
                                       description="Classifiers for the Classification Accuracy Score of "
                                                   "class-conditional samples, per modality.")
    prompt_attributes: list[PromptAttribute] | None = Field(
        None, description="For samples drawn from text prompts: attributes the prompts ask for, e.g. `[{word: "
                          "thick, opposite: thin, measure: ink}]`; reports the share of matched pairs (\"a thick "
                          "seven\" and \"a thin seven\", k-th sample with k-th) where the `word` sample measures "
                          "higher (noise: about 0.5).")
    control_agreement: bool = Field(
        False, description="For samples drawn under control maps (`controls:`): the correlation of each "
                           "sample's edges (the model's control transform) with its control map, and with another "
                           "sample's as the baseline.")
    max_samples: int = Field(256, ge=2, description="Samples per set and modality (and held-out samples per "
                                                    "store) used by every metric; taken evenly over a larger "
                                                    "store.")
    pairwise_samples: int = Field(1000, ge=2, description="Samples per set kept, evenly over it, for the metrics "
                                                          "that compare samples pairwise (KID, precision and "
                                                          "recall, point-cloud MMD/COV/1-NNA); FID, FVD, CAS, "
                                                          "intensities and NLL use every sample.")
    knn: int = Field(3, ge=1, description="k of the k-NN manifolds for precision and recall.")
    batch_size: int = Field(32, ge=1, description="Samples per model forward when scoring held-out NLL.")
    seed: int = Field(0, description="Seeds the point subsampling of point-cloud metrics and the KID subsets.")
    actors: int = Field(1, ge=1, description="Ray actors that score units of samples in parallel (decode, "
                                             "features, classifier, held-out NLL); the driver reduces them.")
    samples_per_unit: int = Field(64, ge=1, description="Samples per resumable unit of work (a chunk of a set or "
                                                        "of a held-out store): what a crash costs at most. The "
                                                        "metrics do not depend on it.")
    resources: Resources = Field(default_factory=Resources,
                                 description="Ray resources of each scoring actor; num_cpus is also its torch "
                                             "thread count, num_gpus > 0 runs its networks on CUDA.")

    @model_validator(mode="after")
    def _something_to_do(self) -> EvaluateStage:
        if not (self.samples or self.model or self.reconstruction):
            raise ValueError("nothing to evaluate: give samples (with reference), model (with heldout or "
                             "reference) or reconstruction")
        for name in ("reference", "heldout"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.samples and not self.reference:
            raise ValueError("samples need a reference store to be compared with, e.g. reference: "
                             "${tokenize.store}")
        if self.classifier.files() and not self.samples:
            raise ValueError("a classifier judges generated samples: give samples, e.g. samples: "
                             "${sample.samples}")
        if (self.prompt_attributes or self.control_agreement) and not self.samples:
            raise ValueError("prompt_attributes and control_agreement judge generated samples: give samples, "
                             "e.g. samples: ${sample.samples}")
        seen: dict[tuple[str, ...], int] = {}
        for i, a in enumerate(self.prompt_attributes or []):
            pair = tuple(sorted(" ".join(w.lower().split()) for w in (a.word, a.opposite)))
            if pair in seen:
                raise ValueError(f"prompt_attributes[{i}] compares {a.word!r} and {a.opposite!r} again (as "
                                 f"prompt_attributes[{seen[pair]}] does); remove one of them")
            seen[pair] = i
        if self.model and not (self.heldout or self.reference):
            raise ValueError("model needs a heldout (or reference) token store to score")
        return self
