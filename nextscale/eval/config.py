"""Configs of evaluation: ``nextscale sample`` (:class:`SampleConfig`) and ``nextscale fid`` (:class:`FidConfig`).

The FID defaults are the paper's protocol (docs/var.md §3): 50 images for each of 1000 classes,
cfg 1.5, top-k 900, top-p 0.96, ``more_smooth`` off, torch-fidelity's TensorFlow-compatible
Inception-v3, the ADM ``VIRTUAL_imagenet256_labeled.npz`` reference.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nextscale.config import Device, RayConfig, StorageConfig, WandbConfig, doc, require
from nextscale.prior.sample import SamplingConfig

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """The trained prior and tokenizer (nextscale files, or official .pth files built as a preset)."""

    prior_url: str = doc("runs/demo/prior/prior.pt", "VAR weights: prior.pt written by train-prior "
                                                     "({config, state_dict}) or an official var_d*.pth")
    prior_preset: str = doc("d16", "VAR preset used when prior_url is an official state dict without a config")
    tokenizer_url: str = doc("runs/demo/tokenizer/tokenizer.pt", "VQVAE weights: tokenizer.pt written by "
                                                                 "train-tokenizer or the official vae_ch160v4096z32.pth")
    tokenizer_preset: str = doc("vae_ch160v4096z32", "VQVAE preset used when tokenizer_url is an official .pth")

    def __post_init__(self) -> None:
        require(bool(self.prior_url), "models.prior_url is empty: point it at prior.pt (written by train-prior)")
        require(bool(self.tokenizer_url), "models.tokenizer_url is empty: point it at tokenizer.pt")


# the sampling keys lived at the top of the sample / fid configs before they had a section of their own
_SAMPLING_RENAMED = {"cfg": "sampling.guidance", "top_k": "sampling.top_k", "top_p": "sampling.top_p",
                     "more_smooth": "sampling.more_smooth"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditConfig:
    """Zero-shot editing of one given image (VAR paper §7): inpainting, outpainting, class-conditional editing."""

    image: str = doc("", "image to edit (any size; centre-cropped to the tokenizer's size); empty = no edit figure")
    box: tuple[float, float, float, float] = doc((0.25, 0.25, 0.75, 0.75),
                                                 "the edited region (x0, y0, x1, y1) as fractions of the image")
    modes: tuple[str, ...] = doc(("inpaint", "outpaint", "class_edit"),
                                 "rows of the figure: inpaint (regenerate the box), outpaint (keep only the box), "
                                 "class_edit (regenerate the box as edit.label)")
    source_label: int = doc(0, "class of the given image (conditions inpainting and outpainting)")
    label: int = doc(1, "target class of class_edit")
    samples: int = doc(4, "samples per mode (columns)")

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        require(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1,
                f"edit.box={self.box} must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        bad = [m for m in self.modes if m not in ("inpaint", "outpaint", "class_edit")]
        require(not bad, f"edit.modes: unknown mode {bad[0] if bad else ''!r}; choose from inpaint, outpaint, class_edit")
        require(self.samples >= 1, f"edit.samples={self.samples} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Pictures from a trained prior: a class grid, a coarse-to-fine figure and optional zero-shot edits."""

    RENAMED: ClassVar[dict[str, str]] = _SAMPLING_RENAMED

    models: ModelsConfig = doc(ModelsConfig(), "prior and tokenizer weights")
    classes: tuple[int, ...] = doc((0, 1, 2, 3, 4, 5, 6, 7), "classes shown in the grid (one row each)")
    samples_per_class: int = doc(8, "grid columns: samples of each class")
    coarse_to_fine: int = doc(4, "rows of the coarse-to-fine figure (one sample per row, one column per scale)")
    sampling: SamplingConfig = doc(SamplingConfig(), "guidance and filters")
    seed: int = doc(0, "sample i of a picture draws from a generator seeded by (seed, picture, i)")
    upscale: int = doc(1, "nearest-neighbour enlargement of every tile (e.g. 4 for 32-px images)")
    padding: int = doc(2, "pixels between tiles")
    edit: EditConfig = doc(EditConfig(), "zero-shot editing figure")
    output: str = doc("runs/sample", "output URL: grid.png, coarse_to_fine.png, edit.png, summary.json, config.yaml")
    device: Device = doc("auto", "cpu, cuda, or auto = cuda when this process sees a GPU")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases (the pictures are logged as images)")

    def __post_init__(self) -> None:
        require(len(self.classes) >= 1 and all(c >= 0 for c in self.classes),
                f"classes={self.classes} must list at least one class index >= 0")
        require(self.samples_per_class >= 1, f"samples_per_class={self.samples_per_class} must be >= 1")
        require(self.coarse_to_fine >= 0, f"coarse_to_fine={self.coarse_to_fine} must be >= 0 (0 = no figure)")
        require(self.upscale >= 1, f"upscale={self.upscale} must be >= 1")
        require(self.padding >= 0, f"padding={self.padding} must be >= 0")
        require(bool(self.output), "output is empty: set it to a local folder or s3:// URL")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    """What the samples are compared with: an ADM reference batch, or real images run through the same extractor."""

    npz: str = doc("", "ADM reference batch (VIRTUAL_imagenet256_labeled.npz: mu, sigma, arr_0) or the "
                       "reference_stats.npz a previous fid run wrote (mu, sigma, features)")
    images: str = doc("", "real images instead: an ImageFolder / folder of images, a .tar shard or a folder of "
                          ".tar shards (WebDataset, jpg/png members); resized and centre-cropped to the samples' size")
    max_images: int = doc(0, "use at most this many reference images (the first in sorted order); 0 = all")

    def __post_init__(self) -> None:
        require(bool(self.npz) != bool(self.images),
                "set exactly one of reference.npz (an ADM .npz) and reference.images (a folder or tar shards)")
        require(self.max_images >= 0, f"reference.max_images={self.max_images} must be >= 0 (0 = all)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierCheckConfig:
    """The demo's check without Inception weights: a small CNN trained on real images classifies the samples."""

    train_images: str = doc("", "ImageFolder of real training images (class folders in class-index order); "
                                "empty = no classifier check")
    heldout_images: str = doc("", "ImageFolder of held-out real images (the real-image baseline)")
    image_size: int = doc(32, "images are resized to this size for the classifier")
    steps: int = doc(400, "optimizer steps (batch 64; well under a minute on 2 idle CPU cores at 32 px)")
    seed: int = doc(0, "seed of the weights and batch order")

    def __post_init__(self) -> None:
        require(not self.train_images or bool(self.heldout_images),
                "classifier.heldout_images is empty: give held-out real images for the baseline accuracy")
        require(self.image_size >= 8 and self.steps >= 1, "classifier.image_size must be >= 8 and steps >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FidConfig:
    """Sample N images on Ray (class i // samples_per_class, seed from i), then FID / IS / precision / recall."""

    RENAMED: ClassVar[dict[str, str]] = _SAMPLING_RENAMED

    models: ModelsConfig = doc(ModelsConfig(), "prior and tokenizer weights")
    num_samples: int = doc(50_000, "images to sample (paper: 50,000)")
    num_classes: int = doc(1000, "classes; sample i gets class (i // samples_per_class) % num_classes")
    samples_per_class: int = doc(50, "consecutive indices sharing a class (paper: 50)")
    sampling: SamplingConfig = doc(SamplingConfig(), "guidance and filters (defaults: the paper's protocol)")
    seed: int = doc(0, "sampling seed: group g of group_size consecutive indices uses a generator seeded by (seed, g)")
    group_size: int = doc(50, "images per sampler call; part of the sampling protocol like the seed (the same "
                              "seed and group_size give the same images whatever the workers or batch sizes)")
    num_sampler_actors: int = doc(0, "sampler actors; 0 = one per GPU of the cluster, or 1 without GPUs")
    num_feature_actors: int = doc(1, "feature-extractor actors")
    cpus_per_actor: float = doc(1.0, "CPUs Ray reserves per actor")
    device: Device = doc("auto", "cuda = one GPU per sampler / extractor actor, cpu, or auto = cuda when the Ray "
                                 "cluster has GPUs")
    feature_extractor: str = doc("inception-v3-compat", "feature extractor: inception-v3-compat (torch-fidelity's "
                                                        "port of the TF Inception, pool3 2048 + logits) or a "
                                                        "registered one (random-conv-test in tests)")
    inception_weights: str = doc("", f"Inception weights file; empty = $TORCH_HOME/hub/checkpoints/{INCEPTION_FILE} "
                                     "(downloaded there when online)")
    feature_fallback: str = doc("", "extractor used instead when the Inception weights are missing (e.g. "
                                    "random-conv-test for an offline demo; fid.json says so); empty = fail with "
                                    "the error saying where to put the weights")
    feature_batch_size: int = doc(64, "images per feature-extractor call")
    reference: ReferenceConfig = doc(ReferenceConfig(npz="VIRTUAL_imagenet256_labeled.npz"), "reference statistics")
    inception_score: bool = doc(True, "compute the Inception Score (10 splits)")
    precision_recall: bool = doc(True, "compute precision/recall (k=3 nearest neighbours, as the ADM evaluator)")
    save_pngs: bool = doc(False, "write every sample to {output}/samples/{i:06d}.png")
    save_npz: bool = doc(False, "write {output}/samples.npz (arr_0 uint8 N x H x W x 3 for the ADM evaluator, "
                                "plus labels); implies save_pngs")
    classifier: ClassifierCheckConfig = doc(ClassifierCheckConfig(), "demo classifier check (needs save_npz)")
    output: str = doc("runs/fid", "output URL: fid.json, reference_stats.npz, config.yaml, samples")
    ray: RayConfig = doc(RayConfig(), "Ray cluster")
    storage: StorageConfig = doc(StorageConfig(), "object storage")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases")

    def __post_init__(self) -> None:
        require(self.num_samples >= 2, f"num_samples={self.num_samples} must be >= 2 (a covariance needs 2)")
        require(self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1")
        require(self.samples_per_class >= 1, f"samples_per_class={self.samples_per_class} must be >= 1")
        require(self.group_size >= 1, f"group_size={self.group_size} must be >= 1")
        require(self.num_sampler_actors >= 0, f"num_sampler_actors={self.num_sampler_actors} must be >= 0 (0 = auto)")
        require(self.num_feature_actors >= 1, f"num_feature_actors={self.num_feature_actors} must be >= 1")
        require(self.cpus_per_actor >= 0, f"cpus_per_actor={self.cpus_per_actor} must be >= 0")
        require(self.feature_batch_size >= 1, f"feature_batch_size={self.feature_batch_size} must be >= 1")
        require(bool(self.output), "output is empty: set it to a local folder or s3:// URL")
        require(not self.classifier.train_images or self.save_npz,
                "classifier.train_images is set but save_npz is false: the classifier check reads {output}/samples.npz")

    def label_of(self, index: int) -> int:
        """The class of sample ``index``."""
        return (index // self.samples_per_class) % self.num_classes

    @property
    def num_groups(self) -> int:
        return -(-self.num_samples // self.group_size)
