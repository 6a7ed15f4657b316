"""The registered datasets, each read from a tiny fake copy of its official layout made here."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.io import savemat

from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
from conftest import ROOT
from extract.datasets import DATASETS, DatasetNotFoundError, dataset_slug, load_dataset, locate
from extract.datasets.download import Download, check_archive, safe_extract
from extract.errors import UserError
from extract.store import FeatureStore


def write_jpeg(path: Path, *, size=(40, 30), color=(200, 30, 30), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(color, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_cub(root: Path, *, classes=(1, 2, 3), per_class=4, drop_class_folder=None, boxes=True) -> Path:
    """CUB_200_2011 layout; ``drop_class_folder`` lists a class in the txt files without its images."""
    root.mkdir(parents=True)
    images, labels, split, box_lines = [], [], [], []
    image_id = 0
    for c in classes:
        name = f"{c:03d}.Bird_{c}"
        for n in range(per_class):
            image_id += 1
            relative = f"{name}/Bird_{c}_{n:04d}_{image_id}.jpg"
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if n % 2 == 0 else 0}")
            box_lines.append(f"{image_id} 10.0 5.0 20.0 10.0")
            if c != drop_class_folder:
                write_jpeg(root / "images" / relative, size=(80, 60), color=(40 * c, 100, 200 - 40 * c), seed=image_id)
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird_{c}" for c in classes) + "\n")
    if boxes:
        (root / "bounding_boxes.txt").write_text("\n".join(box_lines) + "\n")
    return root


def test_birds_official_layout_splits_match_train_test_split(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=(1, 7, 200))
    dataset = load_dataset("birds", data_dir=str(tmp_path))  # the folder inside DATA_DIR is found
    assert dataset.name == "birds"
    assert dataset.classes == ("001.Bird_1", "007.Bird_7", "200.Bird_200")
    flags = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    expected = Counter("train" if f == "1" else "test" for f in flags.values())
    assert Counter(dataset.splits) == expected == {"train": 6, "test": 6}
    assert dataset.paths[0] == "images/001.Bird_1/Bird_1_0000_1.jpg" and dataset.labels[0] == 0
    assert dataset.read(0).shape == (60, 80, 3)


def test_birds_copy_with_fewer_classes_uses_the_classes_present(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=(1, 2, 3), drop_class_folder=2)
    dataset = load_dataset("birds", data_dir=str(root))
    assert dataset.classes == ("001.Bird_1", "003.Bird_3")
    assert len(dataset) == 8 and set(dataset.labels) == {0, 1}
    assert dataset.info["classes_absent"] == 1


def test_birds_bbox_crop_enlarges_the_box_1_5_times(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    cropped = load_dataset("birds", data_dir=str(root), crop="bbox")
    assert cropped.name == "birds-bbox" and dataset_slug("birds", "bbox") == "birds-bbox"
    # box x=10 y=5 w=20 h=10 -> centre (20, 10), 1.5x: 30 x 15 -> columns 5..35, rows 2.5..17.5
    image = cropped.read(0)
    assert image.shape in {(15, 30, 3), (16, 30, 3)}
    full = load_dataset("birds", data_dir=str(root)).read(0)
    np.testing.assert_array_equal(image, full[2 : 2 + image.shape[0], 5:35])


def test_birds_bbox_without_box_file_is_a_clear_error(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", boxes=False)
    with pytest.raises(FileNotFoundError, match="CROP=bbox needs .*bounding_boxes.txt"):
        load_dataset("birds", data_dir=str(root), crop="bbox")
    with pytest.raises(ValueError, match="only birds"):
        load_dataset("caltech101", crop="bbox")


def test_missing_dataset_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSHELF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("birds")
    message = str(error.value)
    assert "CUB_200_2011.tgz" in message and "97eceeb196236b17998738112f37df78" in message
    assert str(tmp_path / "cache" / "birds") in message and "DATA_DIR" in message
    with pytest.raises(DatasetNotFoundError, match="indoor.html"):
        load_dataset("mit67", data_dir=str(tmp_path))


def test_registry_downloads_carry_checksums_and_layout_markers():
    for spec in DATASETS.values():
        assert spec.source, spec.name
        for download in spec.downloads:
            assert len(download.md5) == 32 and int(download.md5, 16) >= 0, spec.name
            assert download.filename and "?" not in download.filename


def test_caltech101_30_train_50_test_no_overlap_no_background(tmp_path):
    root = tmp_path / "101_ObjectCategories"
    for name, count in (("accordion", 90), ("ant", 42), ("BACKGROUND_Google", 35)):
        for n in range(count):
            write_jpeg(root / name / f"image_{n + 1:04d}.jpg", size=(8, 8))
    dataset = load_dataset("caltech101", data_dir=str(tmp_path), seed=3)
    assert dataset.classes == ("accordion", "ant")
    counts = dataset.counts()
    assert counts["train"] == {"accordion": 30, "ant": 30}
    assert counts["test"] == {"accordion": 50, "ant": 12}
    train = {p for p, s in zip(dataset.paths, dataset.splits) if s == "train"}
    test = {p for p, s in zip(dataset.paths, dataset.splits) if s == "test"}
    assert not train & test
    other = load_dataset("caltech101", data_dir=str(tmp_path), seed=4)
    assert {p for p, s in zip(other.paths, other.splits) if s == "train"} != train


def test_scene15_100_per_class_for_training(tmp_path):
    root = tmp_path / "15-Scene"
    for name in ("bedroom", "coast"):
        for n in range(104):
            write_jpeg(root / name / f"{n}.jpg", size=(8, 8))
    dataset = load_dataset("scene15", data_dir=str(tmp_path))
    assert dataset.counts()["train"] == {"bedroom": 100, "coast": 100}
    assert dataset.counts()["test"] == {"bedroom": 4, "coast": 4}


def test_mit67_official_lists(tmp_path):
    root = tmp_path / "indoorCVPR_09"
    for name in ("kitchen", "bar"):
        for n in range(3):
            write_jpeg(root / "Images" / name / f"{name}{n}.jpg", size=(8, 8))
    (root / "TrainImages.txt").write_text("kitchen/kitchen0.jpg\nkitchen/kitchen1.jpg\nbar/bar0.jpg\n")
    (root / "TestImages.txt").write_text("kitchen/kitchen2.jpg\nbar/bar1.jpg\n")
    dataset = load_dataset("mit67", data_dir=str(tmp_path))
    assert dataset.classes == ("bar", "kitchen")
    assert Counter(dataset.splits) == {"train": 3, "test": 2}
    assert ("Images/bar/bar1.jpg", "test") in set(zip(dataset.paths, dataset.splits))


def test_office31_and_office_caltech10_domains_are_splits(tmp_path):
    office = tmp_path / "office31"
    for domain in ("amazon", "dslr", "webcam"):
        for name in ("mug", "bike"):
            for n in range(2 if domain != "amazon" else 3):
                write_jpeg(office / domain / "images" / name / f"frame_{n:04d}.jpg", size=(8, 8))
    dataset = load_dataset("office31", data_dir=str(office))
    assert Counter(dataset.splits) == {"amazon": 6, "dslr": 4, "webcam": 4}
    assert dataset.paths[0] == "amazon/images/bike/frame_0000.jpg"
    assert "transfer:amazon->webcam" in DATASETS["office31"].protocols

    ten = tmp_path / "office_caltech_10"
    for domain in ("amazon", "Caltech10", "dslr", "webcam"):  # the names people have: any case, with or without 10
        write_jpeg(ten / domain / "mug" / "1.jpg", size=(8, 8))
    assert Counter(load_dataset("office_caltech10", data_dir=str(tmp_path)).splits) == {d: 1 for d in ("amazon", "caltech", "dslr", "webcam")}
    (ten / "Caltech10").rename(ten / "caltech256")
    with pytest.raises(UserError, match=r"no folder for the office_caltech10 domain 'caltech'.*found: amazon, caltech256, dslr, webcam"):
        load_dataset("office_caltech10", data_dir=str(ten))


def test_flowers102_official_mat_files(tmp_path):
    root = tmp_path / "flowers102"
    labels = np.array([1, 1, 2, 2, 2, 3])
    for i in range(1, 7):
        write_jpeg(root / "jpg" / f"image_{i:05d}.jpg", size=(8, 8))
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 3, 6]]), "valid": np.array([[2, 4]]), "tstid": np.array([[5]])})
    dataset = load_dataset("flowers102", data_dir=str(root))
    assert dataset.classes == ("class_001", "class_002", "class_003")
    assert dataset.splits == ("train", "val", "train", "val", "test", "train")
    assert list(dataset.labels) == [0, 0, 1, 1, 1, 2]


def test_hymenoptera_and_csv(tmp_path):
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            write_jpeg(tmp_path / "hymenoptera_data" / split / name / "1.jpg", size=(8, 8))
    dataset = load_dataset("hymenoptera", data_dir=str(tmp_path))
    assert dataset.name == "hymenoptera" and Counter(dataset.splits) == {"train": 2, "val": 2}

    (tmp_path / "list.csv").write_text("path,label,split\nhymenoptera_data/train/ants/1.jpg,ant,train\n"
                                       "hymenoptera_data/val/bees/1.jpg,bee,test\n")
    listed = load_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert listed.name == "list" and listed.classes == ("ant", "bee") and listed.splits == ("train", "test")
    assert listed.read(1).shape == (8, 8, 3)
    (tmp_path / "bad.csv").write_text("file,class\nx.jpg,a\n")
    with pytest.raises(ValueError, match="bad.csv: header must be path,label"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}")


VOC_XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
VOC_OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult></object>"


def make_voc(root: Path) -> Path:
    """Six images: cats, dogs and persons; one person only 'difficult'."""
    voc = root / "VOCdevkit" / "VOC2007"
    layout = {
        "000001": [("cat", 0)], "000002": [("dog", 0), ("person", 0)], "000003": [("cat", 0), ("person", 1)],
        "000004": [("dog", 0)], "000005": [("cat", 0), ("person", 0)], "000006": [("dog", 0), ("person", 0)],
        "000007": [("cat", 0)], "000008": [("dog", 0), ("person", 0)],
    }
    for n, (image_id, objects) in enumerate(layout.items()):
        color = (220, 60, 60) if objects[0][0] == "cat" else (60, 60, 220)
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", size=(32, 32), color=color, seed=n)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        xml = VOC_XML.format(id=image_id, objects="".join(VOC_OBJECT.format(name=a, difficult=d) for a, d in objects))
        (voc / "Annotations" / f"{image_id}.xml").write_text(xml)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n000004\n000005\n000006\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000007\n000008\n")
    return voc


def test_voc2007_multilabel_targets_store_and_map_probe(tmp_path):
    from baselines.simple import ColorHistogram
    from extract.pipeline import extract_to_store

    make_voc(tmp_path)
    dataset = load_dataset("voc2007", data_dir=str(tmp_path))
    cat, dog, person = (dataset.classes.index(c) for c in ("cat", "dog", "person"))
    assert Counter(dataset.splits) == {"train": 6, "test": 2}
    assert dataset.targets.shape == (8, 20)
    assert list(dataset.targets[2, [cat, dog, person]]) == [1, 0, -1]  # difficult person
    assert list(dataset.targets[1, [cat, dog, person]]) == [0, 1, 1]

    featurizer = ColorHistogram()
    path = extract_to_store(dataset, featurizer, tmp_path / "features" / "voc2007" / "color.h5", progress=False)
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.multilabel, dataset.targets)
    small = ProbeSettings(Cs=(0.1, 1.0), cv=2)
    with pytest.raises(ValueError, match="'aeroplane' has no positive"):
        Evaluation(path, parse_protocol("given"), small).run(progress=False)


def test_voc_map_probe_on_classes_present(tmp_path):
    """A store whose every class has positives and negatives: one binary probe per class, mAP."""
    from baselines.simple import ColorHistogram
    from extract.datasets.base import file_dataset
    from extract.pipeline import extract_to_store

    voc = make_voc(tmp_path)
    full = load_dataset("voc2007", data_dir=str(tmp_path))
    keep = [full.classes.index(c) for c in ("cat", "dog", "person")]
    entries = [(p, full.classes[keep[int(np.argmax(t[keep] == 1))]], s) for p, t, s in zip(full.paths, full.targets, full.splits)]
    dataset = file_dataset("voc3", voc, entries, classes=[full.classes[c] for c in keep], targets=full.targets[:, keep])
    path = extract_to_store(dataset, ColorHistogram(), tmp_path / "voc3.h5", progress=False)
    rows = Evaluation(path, parse_protocol("given"), ProbeSettings(Cs=(0.1, 1.0), cv=2), out_dir=tmp_path / "out").run(progress=False)
    assert len(rows) == 1 and np.isnan(rows[0]["top1"])
    # cats are red and dogs blue: both test images are ranked right for cat and dog
    from classify.metrics import average_precision

    from classify.results import output_stem

    scores = pd.read_csv(tmp_path / "out" / "predictions" / "color" / f"{output_stem(rows[0])}.scores.csv")
    truth = dataset.targets[np.asarray(dataset.splits) == "test"]
    assert [average_precision(truth[:, c], scores[name]) for c, name in enumerate(("cat", "dog"))] == [1.0, 1.0]
    person = average_precision(truth[:, 2], scores["person"])
    assert rows[0]["mAP"] == pytest.approx((2 + person) / 3) and rows[0]["mAP"] > 2 / 3


def _tar_with(path: Path, name: str, *, symlink_to: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if symlink_to:
            info.type, info.linkname = tarfile.SYMTYPE, symlink_to
            tar.addfile(info)
        else:
            data = b"evil"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_safe_extraction_refuses_entries_escaping_the_target(tmp_path):
    target = tmp_path / "out"
    for archive in (_tar_with(tmp_path / "dots.tar", "../escaped.txt"), _tar_with(tmp_path / "abs.tar", "/tmp/escaped_abs.txt"),
                    _tar_with(tmp_path / "link.tar", "data/link", symlink_to="../../../etc/passwd")):
        with pytest.raises(ValueError, match="outside"):
            safe_extract(archive, target)
    zipped = tmp_path / "slip.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("../../slip.txt", "evil")
    with pytest.raises(ValueError, match="'../../slip.txt' would be written outside"):
        check_archive(zipped, target)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "slip.txt").exists()

    good = _tar_with(tmp_path / "good.tar", "CUB_200_2011/images.txt")
    safe_extract(good, target)
    assert (target / "CUB_200_2011" / "images.txt").read_bytes() == b"evil"
    assert Download("https://host/x/CUB_200_2011.tgz?download=1", "0" * 32).filename == "CUB_200_2011.tgz"


def test_fetch_uses_a_verified_archive_already_in_the_cache(tmp_path, monkeypatch):
    """An archive placed in the cache by hand is checked and extracted without the network."""
    import extract.datasets as registry

    archive = tmp_path / "src" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    cub = make_cub(tmp_path / "staging" / "CUB_200_2011", classes=(1,), per_class=2)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cub, arcname="CUB_200_2011")
    cache = tmp_path / "cache"
    (cache / "birds").mkdir(parents=True)
    (cache / "birds" / archive.name).write_bytes(archive.read_bytes())
    monkeypatch.setenv("OFFSHELF_CACHE", str(cache))
    spec = registry.DATASETS["birds"]
    monkeypatch.setitem(registry.DATASETS, "birds", spec.__class__(**{
        **spec.__dict__, "downloads": (Download(spec.downloads[0].url, hashlib.md5(archive.read_bytes()).hexdigest()),)}))
    assert registry.fetch_dataset("birds", progress=False) == cache / "birds" / "CUB_200_2011"
    assert locate(registry.DATASETS["birds"]) == cache / "birds" / "CUB_200_2011"
    assert len(load_dataset("birds")) == 2
    (cache / "birds" / archive.name).write_bytes(b"corrupt")
    (cache / "birds" / "CUB_200_2011" / "images.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="cannot download"):
        registry.fetch_dataset("birds", progress=False)  # offline: the corrupt copy is not trusted


def test_make_extract_birds_and_data_info_on_the_official_layout(tmp_path):
    """`python -m extract features --dataset birds --data-dir ...` as `make extract` runs it."""
    root = make_cub(tmp_path / "CUB_200_2011", classes=(1, 2), per_class=3)
    (root / "images" / "002.Bird_2" / "Bird_2_0001_5.jpg").write_bytes(b"not a jpeg")
    (root / "images" / "001.Bird_1" / "Bird_1_0002_3.jpg").unlink()
    run = lambda *args: subprocess.run([sys.executable, "-m", "extract", *args], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    info = run("data-info", "--dataset", "birds", "--data-dir", str(root), "--no-progress")
    assert info.returncode == 0, info.stderr
    assert "missing files: 1\n  images/001.Bird_1/Bird_1_0002_3.jpg" in info.stdout
    assert "unreadable files: 1\n  images/002.Bird_2/Bird_2_0001_5.jpg" in info.stdout
    features = tmp_path / "features"
    done = run("features", "--dataset", "birds", "--data-dir", str(root), "--model", "efficientnet_lite0", "--weights", "random",
               "--layers", "stage1,pre_logits", "--features-dir", str(features), "--on-error", "skip", "--no-progress")
    assert done.returncode == 0, done.stderr
    with FeatureStore(features / "birds" / "efficientnet_lite0-random.h5") as store:
        assert store.classes == ["001.Bird_1", "002.Bird_2"]
        assert Counter(store.splits) == {"train": 3, "test": 1}  # 6 images, 2 skipped, flags alternate
        assert sorted(p for p, _ in store.skipped) == ["images/001.Bird_1/Bird_1_0002_3.jpg", "images/002.Bird_2/Bird_2_0001_5.jpg"]
        assert store.features("pre_logits").shape == (4, 1280)


def test_office_domains_get_every_transfer_by_default_and_a_report(tmp_path):
    """`make baselines` + `make classify` + `make report` on a fake Office-31: six source->target pairs, each
    with the whole source domain and with the sampled protocol. Domain folders in any case."""
    office = tmp_path / "office31"
    for d, domain in enumerate(("Amazon", "dslr", "WEBCAM")):
        for c, (name, colour) in enumerate((("mug", (220, 40, 40)), ("bike", (40, 40, 220)))):
            for n in range(4):
                write_jpeg(office / domain / "images" / name / f"frame_{n:04d}.jpg", size=(24, 24), color=colour, seed=10 * d + 3 * c + n)
    dirs = ["--features-dir", str(tmp_path / "features")]
    outs = [*dirs, "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    for command in (["baselines", "--dataset", "office31", "--data-dir", str(office), "--baselines", "color", *dirs, "--no-progress"],
                    ["classify", "probe", "--dataset", "office31", "--cs", "0.1,1", "--cv", "2", *outs, "--no-progress"],
                    ["classify", "report", "--dataset", "office31", *outs]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "results" / "office31" / "results.csv")
    assert sorted(table["protocol"]) == sorted(DATASETS["office31"].protocols) and len(table) == 12
    pairs = {(a, b) for a in ("amazon", "dslr", "webcam") for b in ("amazon", "dslr", "webcam") if a != b}
    for kind in ("transfer:", "sampled:"):
        rows = table[table["protocol"].str.startswith(kind)]
        assert set(zip(rows["train_split"], rows["test_split"])) == pairs
    assert (table["top1"] == 1.0).all()  # red mugs and blue bikes in every domain
    report = (tmp_path / "reports" / "office31" / "report.md").read_text()
    # ranked by the mean CV score over the six whole-source transfers
    assert "Best by cross-validation on the training data: **color / hsv256 / logreg** (CV 100.00%, the only candidate), top-1 100.00%" in report
    assert "## Domain transfer: whole source domain" in report and "## Domain transfer: sampled protocol" in report
    assert "| amazon->webcam | 100.0 ± 0.0 (hsv256) |" in report
    assert "DeCAF6 LogReg / SVM" in report


def test_bird_boxes_are_warped_whole_into_the_model_input(tmp_path):
    """A 2:1 box with a marker at each end: with CROP=bbox both ends reach the CNN's input (DeCAF
    warped the crop); the centre square of the shorter side would lose 25% of the bird."""
    from extract.extractor import CNNFeaturizer

    root = make_cub(tmp_path / "CUB_200_2011", classes=(1,), per_class=2)
    relative = (root / "images.txt").read_text().splitlines()[0].split()[1]
    image = np.full((60, 80, 3), 128, np.uint8)  # box 10,5 20x10 enlarged 1.5x: x 5..35, y 2..18
    image[2:18, 5:9] = (255, 0, 0)
    image[2:18, 31:35] = (0, 0, 255)
    Image.fromarray(image).save(root / "images" / relative.replace(".jpg", ".png"))
    (root / "images" / relative).unlink()
    (root / "images.txt").write_text((root / "images.txt").read_text().replace(relative, relative.replace(".jpg", ".png")))
    dataset = load_dataset("birds", data_dir=str(root), crop="bbox")
    assert dataset.resize == "warp" and load_dataset("birds", data_dir=str(root)).resize == "centre"
    featurizer = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem", resize=dataset.resize)
    model_input = featurizer.prepare(dataset.read(0))
    red = np.all(np.abs(model_input.astype(int) - (255, 0, 0)) < 60, axis=-1)
    blue = np.all(np.abs(model_input.astype(int) - (0, 0, 255)) < 60, axis=-1)
    assert red[:, :30].any() and blue[:, -30:].any()
    assert featurizer.fingerprint()["preprocessing"]["resize"] == "warp"
    centre = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem").prepare(dataset.read(0))
    assert not np.all(np.abs(centre.astype(int) - (255, 0, 0)) < 60, axis=-1).any()
    # the baselines that make images square do it the same way, and record it
    from baselines.registry import build_baseline

    for name in ("hog", "raw", "color"):
        assert build_baseline(name, dataset).fingerprint()["resize"] == "warp", name
    raw = build_baseline("raw", dataset)
    thumbnail = raw.prepare(dataset.read(0)).reshape(raw.side, raw.side)
    assert thumbnail[:, :2].min() < 0.4 and thumbnail[:, -2:].min() < 0.2  # red and blue ends are darker than the grey


def test_office_baselines_learn_codebooks_on_amazon(tmp_path):
    """`make baselines` on a fake Office-31 (domains are the splits, no `train`): every default
    baseline, paper preset, writes its store; codebooks are learned on amazon, or on the split asked for."""
    office = tmp_path / "office31"
    rng = np.random.default_rng(0)
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        for c, name in enumerate(("mug", "bike")):
            for n in range(3):
                pixels = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((6, 6, 1))).astype(np.uint8)  # 48 px of texture
                path = office / domain / "images" / name / f"frame_{n:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, quality=90)
    features = tmp_path / "features"
    done = subprocess.run([sys.executable, "-m", "baselines", "--dataset", "office31", "--data-dir", str(office),
                           "--features-dir", str(features), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stores = sorted(p.name for p in (features / "office31").glob("*.h5"))
    assert stores == sorted(f"{n}.h5" for n in ("hog", "surf_bow", "sift_bow", "sift_vlad", "sift_fisher", "color", "raw"))
    for name in ("surf_bow", "sift_bow", "sift_vlad", "sift_fisher"):
        with FeatureStore(features / "office31" / f"{name}.h5") as store:
            assert len(store) == 18 and store.fingerprint["preset"] == "paper"
            assert store.fingerprint["codebook_sample"]["split"] == "amazon"
    done = subprocess.run([sys.executable, "-m", "baselines", "--dataset", "office31", "--data-dir", str(office), "--baselines", "sift_bow",
                           "--codebook-split", "dslr", "--features-dir", str(features), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "holds features made with other settings" in done.stderr  # the split is in the fingerprint
    done = subprocess.run([sys.executable, "-m", "baselines", "--dataset", "office31", "--data-dir", str(office), "--baselines", "sift_bow",
                           "--codebook-split", "train", "--features-dir", str(features), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert "has no 'train' split to learn codebooks from; its splits: amazon, dslr, webcam" in done.stderr
