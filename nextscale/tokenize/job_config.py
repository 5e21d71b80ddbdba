"""Config of the pretokenizing job: ``nextscale tokenize CONFIG key.sub=value`` (images -> code shards)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from nextscale.config import (
    Device,
    RayConfig,
    Renamed,
    StorageConfig,
    WandbConfig,
    doc,
    require,
    use_gpu_renamed,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """Decode images, make K augmented views each, encode them with a multi-scale VQVAE, write code shards."""

    RENAMED: ClassVar[dict[str, Renamed]] = {"use_gpu": use_gpu_renamed("device")}

    input: str = doc("data/demo/train", "images: an ImageFolder root (<root>/<class>/<image>), webdataset image "
                                         "tars (jpg/cls) or parquet files (image bytes + label columns): a folder "
                                         "of them, a glob, a {000..099} brace pattern, or a comma-separated list; "
                                         "local path, s3://, gs:// or hf://datasets/...")
    input_format: Literal["auto", "imagefolder", "webdataset", "parquet"] = doc(
        "auto", "auto = webdataset / parquet when input names .tar / .parquet files or a folder of only those, "
                "else imagefolder")
    image_column: str = doc("image", "parquet input: the column of image bytes (or {bytes, path} structs)")
    label_column: str = doc("label", "parquet input: the column of integer class labels")
    class_list: str = doc("", "optional JSON file fixing the class index: a list of wnids/folder names, or "
                              "imagenet_classes.json entries ({index, wnid, ...}); empty = sorted class folders")
    num_classes: int = doc(0, "webdataset input without class_list: the number of classes (samples labelled >= it "
                              "are rejected); 0 = the largest label + 1, and the job stops if a class below it "
                              "has no sample (a stray label)")
    tokenizer: str = doc("runs/demo/tokenizer/tokenizer.pt", "a tokenizer.pt from train-tokenizer, an official "
                                                             ".pth, or a preset name (random weights: tests only)")
    tokenizer_preset: str = doc("vae_ch160v4096z32", "architecture of an official .pth (tokenizer.pt files carry "
                                                      "their own config)")
    image_size: int = doc(0, "view side in pixels; 0 = the tokenizer's image_size (any other value must equal it)")
    views: int = doc(1, "K augmented views encoded per image (training draws one per epoch)")
    augmentation: Literal["official", "center"] = doc(
        "official", "official = Lanczos resize of the shorter side to round(crop_ratio*size), random crop, no flip; "
                    "center = resize the shorter side to size, centre crop (evaluation sets)")
    crop_ratio: float = doc(1.125, "official augmentation: shorter side resized to round(crop_ratio * image_size)")
    min_image_side: int = doc(16, "images whose shorter side is below this are rejected (too small to upsample)")
    samples_per_shard: int = doc(1000, "images per output shard (ImageFolder input; webdataset input keeps its tars 1:1)")
    max_images: int = doc(0, "ImageFolder input: use only the first N listed files (0 = all; smoke tests, benchmarks)")
    output: str = doc("runs/demo/codes", "output URL: codes-*.tar, index.parquet, manifest.json, config.yaml")
    seed: int = doc(0, "seed of the crops (with the image key and view) and of preset random weights")
    batch_size: int = doc(64, "images (views) per encoder call; also the unit of deterministic batching")
    precision: Literal["fp32", "bf16"] = doc("fp32", "encoder precision on GPU (fp32 keeps codes exact; "
                                                      "the quantiser always runs fp32); CPU always runs fp32")
    channels_last: bool = doc(False, "encoder convolutions in channels-last (NHWC) layout, the layout of cuDNN's "
                                     "fast kernels (same codes up to float rounding; part of the job's settings)")
    num_encoders: int = doc(0, "encoder actors; 0 = one per GPU, or 1 without GPUs")
    encoder_num_cpus: float = doc(1.0, "CPUs reserved per encoder actor (its torch threads when on CPU)")
    device: Device = doc("auto", "cuda = encode on GPUs (one per encoder actor), cpu, or auto = cuda when the Ray "
                                 "cluster has GPUs")
    decode_resources: dict[str, float] = doc({}, "custom Ray resources per decode task, e.g. {decode: 1} to keep "
                                                 "decoding on the nodes that advertise them (configs/cluster)")
    encoder_resources: dict[str, float] = doc({}, "custom Ray resources per encoder actor, e.g. {encode: 1}")
    read_threads: int = doc(8, "threads reading image bytes inside each shard task (object-store latency)")
    ray: RayConfig = doc(RayConfig(), "Ray cluster")
    storage: StorageConfig = doc(StorageConfig(), "object storage")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases")

    def __post_init__(self) -> None:
        require(bool(self.input), "input is empty: point it at an ImageFolder root or webdataset tars")
        require(bool(self.output), "output is empty: give the URL where the code shards go")
        require(bool(self.tokenizer), "tokenizer is empty: give a tokenizer.pt, an official .pth or a preset name")
        require(self.views >= 1, f"views={self.views} must be >= 1")
        require(self.num_classes >= 0, f"num_classes={self.num_classes} must be >= 0")
        require(not (self.num_classes and self.class_list), "give class_list or num_classes, not both")
        require(self.augmentation == "official" or self.views == 1,
                f"views={self.views} with augmentation=center gives identical views; set views=1")
        require(self.crop_ratio >= 1.0, f"crop_ratio={self.crop_ratio} must be >= 1")
        require(self.image_size >= 0, f"image_size={self.image_size} must be >= 0 (0 = the tokenizer's)")
        require(self.min_image_side >= 1, f"min_image_side={self.min_image_side} must be >= 1")
        require(self.samples_per_shard >= 1, f"samples_per_shard={self.samples_per_shard} must be >= 1")
        require(self.max_images >= 0, f"max_images={self.max_images} must be >= 0")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        require(self.num_encoders >= 0, f"num_encoders={self.num_encoders} must be >= 0")
        require(self.encoder_num_cpus > 0, f"encoder_num_cpus={self.encoder_num_cpus} must be > 0")
        require(self.read_threads >= 1, f"read_threads={self.read_threads} must be >= 1")
