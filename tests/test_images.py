"""nextscale.images: the preprocessing is torchvision's as the official VAR code uses it, bit for bit; the
listing accounts for every entry on disk or stops naming what it cannot read."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from nextscale import codes
from nextscale.images import (
    InputError,
    center_view,
    classes_from_labels,
    label_reason,
    list_image_folder,
    make_views,
    resize_shorter,
    to_float,
)

# landscape, portrait, odd and even margins, already at size, smaller than the target (upsampling)
SIZES = [(90, 70), (70, 90), (257, 300), (301, 256), (64, 64), (72, 72), (40, 50), (101, 77)]


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_resize_and_center_crop_equal_torchvision(size):
    img = _photo(sum(size), size)
    for side in (64, 72):
        official = transforms.Compose([transforms.Resize(side, interpolation=InterpolationMode.LANCZOS),
                                       transforms.CenterCrop(side)])
        resized = transforms.Resize(side, interpolation=InterpolationMode.LANCZOS)(img)
        assert resize_shorter(img, side).size == resized.size
        assert np.array_equal(np.asarray(resize_shorter(img, side)), np.asarray(resized))
        assert np.array_equal(np.asarray(center_view(img, side)), np.asarray(official(img)))
        view = make_views(img, "k", image_size=side, views=1, augmentation="center", seed=0)[0]
        assert np.array_equal(view, np.asarray(official(img)))


@pytest.mark.parametrize("size", SIZES)
def test_official_views_are_torchvision_random_crops_of_the_lanczos_resize(size):
    """The official training transform: Resize(round(1.125 * S), LANCZOS) then RandomCrop(S), no flip.
    Every view must be exactly torchvision's crop of that resize at some offset (the offsets are ours, seeded)."""
    img, side = _photo(7 + sum(size), size), 64
    resized = transforms.Resize(round(1.125 * side), interpolation=InterpolationMode.LANCZOS)(img)
    w, h = resized.size
    crops = {(top, left): np.asarray(TF.crop(resized, top, left, side, side))
             for top in range(h - side + 1) for left in range(w - side + 1)}
    views = make_views(img, "cat/a", image_size=side, views=6, augmentation="official", seed=0, crop_ratio=1.125)
    offsets = [next((o for o, c in crops.items() if np.array_equal(c, v)), None) for v in views]
    assert None not in offsets
    assert len(set(offsets)) > 1 or len(crops) == 1


def test_to_float_equals_totensor_and_normalize_01_into_pm1():
    img = _photo(3, (33, 21))
    t = transforms.ToTensor()(img)
    official = t.add(t).add_(-1)  # VAR utils/data.py normalize_01_into_pm1
    ours = torch.from_numpy(to_float(np.asarray(img)))
    assert ours.dtype == torch.float32 and torch.equal(ours, official) and ours.is_contiguous()
    batch = np.stack([np.asarray(img)] * 2)
    assert torch.equal(torch.from_numpy(to_float(batch))[1], official)


# ------------------------------------------------------------------------------------------------
# Listing: every entry on disk is an item (accepted or rejected with its reason), or the listing stops


def _tree(root: Path, files: list[str]) -> None:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_listing_accounts_for_every_entry_on_disk(tmp_path):
    root = tmp_path / "in"
    _tree(root, ["a/1.jpg", "a/sub/2.png", "a/.DS_Store", "b/3.JPEG", "b/notes.txt", ".hidden.jpg",
                 ".cache/x.jpg", ".cache/y.jpg", "stray.jpg"])
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # broken link inside a class
    (root / "loop").symlink_to("loop")  # a link to itself: neither file nor folder
    items, classes = list_image_folder(str(root))
    assert classes == ["a", "b"]
    got = {it["key"]: (it["label"], it["reason"].split(" (")[0].split(":")[0]) for it in items}
    assert got == {
        "_cache": (-1, "hidden"), "_hidden_jpg": (-1, "hidden"), "a/_DS_Store": (0, "hidden"),
        "a/1": (0, ""), "a/gone": (0, "a symbolic link to a file or folder that does not exist"), "a/sub/2": (0, ""),
        "b/3": (1, ""), "b/notes": (1, "not an image file"),
        "loop": (-1, "a symbolic link to a folder that contains it, or to itself"),
        "stray": (-1, "not inside a class folder"),
    }
    # on disk: 11 entries at the level the listing stops (a hidden folder is one entry, not entered)
    on_disk = [p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()]
    assert len(items) == len([p for p in on_disk if ".cache" not in p.parts]) + 1
    assert [it["source"] for it in items if it["key"] == "a/1"] == [str(root / "a" / "1.jpg")]


def test_symbolic_links_that_resolve_are_followed_the_others_rejected_saying_why(tmp_path):
    store, root = tmp_path / "store", tmp_path / "in"
    _tree(store, ["photo.jpg", "dogs/1.jpg", "dogs/2.png"])
    _tree(root, ["cat/1.jpg"])
    (root / "cat" / "linked.jpg").symlink_to(store / "photo.jpg")  # a link to a file: an input
    (root / "dog").symlink_to(store / "dogs")  # a class folder linked from a shared store: walked, a class
    (root / "cat" / "gone.jpg").symlink_to(store / "missing.jpg")  # dangling
    (root / "cat" / "up").symlink_to(root)  # a link to a folder the walk is inside: a loop, not walked
    (store / "dogs" / "back").symlink_to(root)  # from inside the linked class folder back to the root: a loop
    items, classes = list_image_folder(str(root))
    assert classes == ["cat", "dog"]
    got = {it["key"]: (it["label"], it["reason"].split(" (")[0]) for it in items}
    assert got == {
        "cat/1": (0, ""), "cat/linked": (0, ""), "dog/1": (1, ""), "dog/2": (1, ""),
        "cat/gone": (0, "a symbolic link to a file or folder that does not exist"),
        "cat/up": (0, "a symbolic link to a folder that contains it, or to itself"),
        "dog/back": (1, "a symbolic link to a folder that contains it, or to itself"),
    }
    sources = {it["key"]: it["source"] for it in items}
    assert sources["dog/2"] == str(root / "dog" / "2.png") and sources["cat/linked"] == str(root / "cat/linked.jpg")
    # the same store linked twice is two classes (not a loop): each link is its own folder of the input
    (root / "wolf").symlink_to(store / "dogs")
    items, classes = list_image_folder(str(root))
    assert classes == ["cat", "dog", "wolf"] and sum(it["key"].startswith("wolf/") and not it["reason"]
                                                      for it in items) == 2


def test_an_empty_class_folder_stops_the_listing_or_keeps_its_index(tmp_path, caplog):
    root = tmp_path / "in"
    _tree(root, ["a/1.jpg", "c/2.jpg", "d/readme.txt"])
    (root / "b").mkdir()
    with pytest.raises(InputError, match=r"class folder\(s\) 'b', 'd' under .* hold no image file"):
        list_image_folder(str(root))
    # with a class list every class keeps its index, and the empty ones are named in the log
    items, classes = list_image_folder(str(root), ["a", "b", "c", "d"])
    assert {it["key"]: it["label"] for it in items if not it["reason"]} == {"a/1": 0, "c/2": 2}
    assert "2 of 4 classes have no image" in caplog.text and "b, d" in caplog.text


def test_the_streamed_listing_is_the_sorted_listing_with_the_same_keys(tmp_path):
    # names around "/" in sort order ("a-1" < "a/" < "a0"), folders beside files of their name, keys that
    # collide once sanitized: inside a folder, across folders ("a b", "a.b", "a_b"), and at the root
    names = ["a/x.jpg", "a/x.png", "a/x_1.jpg", "a/sub/1.jpg", "a/sub.jpg", "a/sub-1.jpg", "a/sub0.jpg",
             "a-1/x.jpg", "a0/x.jpg", "a b/x.jpg", "a.b/x.jpg", "a_b/x.jpg", "a_b/x.png", "b/c/d/e.jpg",
             "b/c.d/e.jpg", "b/c-d/e.jpg", "r.jpg", "r.png", "r_1.jpg", ".r.jpg", "z/.hidden/q.jpg", "z/q.jpg"]
    root = tmp_path / "in"
    _tree(root, names)
    items, classes = list_image_folder(str(root))
    # the listing as one sorted list of every path, keys made unique over the whole of it
    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".hidden" not in p.parts)
    entries = sorted([*entries, "z/.hidden"])
    seen: dict[str, int] = {}
    expected = [codes.unique_key(codes.sanitize_key(rel if "/." in f"/{rel}" else os.path.splitext(rel)[0]), seen)
                for rel in entries]
    assert [it["source"] for it in items] == [str(root / rel) for rel in entries]
    assert [it["key"] for it in items] == expected
    assert len(set(expected)) == len(expected) and "a_b/x_1" in expected and "r_1_1" in expected
    assert classes == ["a", "a b", "a-1", "a.b", "a0", "a_b", "b", "z"]


def test_planning_an_image_folder_holds_a_few_bytes_per_file(tmp_path):
    """The tokenize driver lists ImageNet's 1.28 M files: it holds one folder's listing at a time and each
    shard's items compressed (~20 B per file; the whole listing as a list of dicts held ~540 B per file)."""
    import tracemalloc

    from nextscale.pipelines.tokenize import plan_shards
    from nextscale.tokenize.job_config import TokenizeConfig

    root, per_class = tmp_path / "in", 100

    def plan(n_classes: int) -> tuple[int, list]:
        for c in range(n_classes):
            (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / f"n{c:08d}" / f"n{c:08d}_{i:05d}.JPEG").touch()
        cfg = TokenizeConfig(input=str(root), output=str(tmp_path / "out"), tokenizer="golden_tiny",
                             samples_per_shard=500)
        tracemalloc.start()
        tasks, classes, _ = plan_shards(cfg)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(classes) == n_classes and sum(len(t.items) for t in tasks) == n_classes * per_class
        return peak, tasks

    peak_small, _ = plan(30)
    peak, tasks = plan(60)
    assert tasks[7].items[0]["key"] == "n00000035/n00000035_00000" and tasks[7].items[0]["label"] == 35
    grown = (peak - peak_small) / (30 * per_class)
    assert grown < 100, f"planning held {grown:.0f} more bytes per added file"


def _in_child_as_nobody(fn) -> str:
    """fn() in a forked child that dropped root (uid/gid 65534): the permission checks root skips apply there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


def test_an_unreadable_class_folder_stops_the_listing_naming_it():
    root = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp folders are private to root; this one is not
    try:
        os.chmod(root, 0o755)
        _tree(root, ["a/1.jpg", "b/2.jpg"])
        list_image_folder(str(root))  # readable: fine (and every module the child needs is imported)
        os.chmod(root / "b", 0)

        def attempt() -> str:
            try:
                list_image_folder(str(root))
                return "listed"
            except InputError as e:
                return f"InputError: {e}"

        out = attempt() if os.geteuid() != 0 else _in_child_as_nobody(attempt)
        assert out.startswith(f"InputError: cannot list folder '{root / 'b'}' (PermissionError"), out
        assert "fix its permissions" in out
    finally:
        os.chmod(root / "b", 0o755)
        shutil.rmtree(root)


def test_classes_from_labels_refuses_a_stray_label():
    rows = [{"label": label, "status": status, "source": f"in.tar#{i}"}
            for i, (label, status) in enumerate([(0, "accepted"), (2, "accepted"), (1, "accepted"), (7, "rejected")])]
    assert classes_from_labels(rows) == ["0", "1", "2"]  # rejected samples do not count
    rows.append({"label": 999999, "status": "accepted", "source": "in.tar#4"})
    with pytest.raises(InputError, match=r"labels reach 999999 \(sample in.tar#4\) but only 4 of the 1000000 classes"):
        classes_from_labels(rows)
    assert label_reason(-1, 0) == "negative label -1" and label_reason(5, 0) == label_reason(1, 2) == ""
    assert label_reason(2, 2).startswith("label 2 is outside the 2 classes (0..1)")
