"""Data problems surface through ``pqd run`` as one clear error naming the file or class, before
any training starts (no teacher epoch, no checkpoint in the run directory)."""

from __future__ import annotations

import tarfile

import numpy as np
from PIL import Image
from rbhelpers import folder_config, read_metrics, tiny, write_config, write_folder
from safetensors.torch import save_file

from pqd.cli import main
from pqd.models.registry import create_model


def _fails_before_training(capsys, tmp_path, cfg: dict, *fragments: str) -> str:
    out = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("pqd: error: ")]
    for f in fragments:
        assert f in line, line
    assert "teacher epoch" not in err, "training started before the data problem was reported"
    assert not list(out.glob("*.safetensors")) and not (out / "stages").exists()
    return line


def test_missing_folder_root(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    _fails_before_training(capsys, tmp_path, folder_config(missing), "data.root", str(missing), "does not exist")


def test_missing_cifar_root(capsys, tmp_path):
    missing = tmp_path / "no-cifar"
    cfg = tiny(data={"dataset": "cifar10", "root": str(missing), "train_subset": None, "test_subset": None})
    _fails_before_training(capsys, tmp_path, cfg, "CIFAR-10", str(missing))


def test_truncated_archive(capsys, tmp_path):
    src = write_folder(tmp_path / "imgs")
    arc = tmp_path / "imgs.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    _fails_before_training(capsys, tmp_path, folder_config(arc), str(arc), "corrupt or truncated")


def test_empty_class_folder(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    for f in (root / "test" / "cow").iterdir():
        f.unlink()
    _fails_before_training(capsys, tmp_path, folder_config(root), "test/cow", "is empty")


def test_unreadable_image(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    bad = root / "train" / "bee" / "004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    _fails_before_training(capsys, tmp_path, folder_config(root), "cannot read image", str(bad))


def test_truncated_image(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs", size=32)
    bad = root / "test" / "ant" / "001.png"
    bad.write_bytes(bad.read_bytes()[:-60])
    _fails_before_training(capsys, tmp_path, folder_config(root), "cannot read image", str(bad))


def test_sixteen_bit_image_is_refused_not_clipped(capsys, tmp_path):
    """PIL's convert('RGB') clips 16-bit grey to 0/255: a silently white image. pqd refuses it."""
    root = write_folder(tmp_path / "imgs")
    bad = root / "train" / "ant" / "002.png"
    Image.fromarray((np.arange(144).reshape(12, 12) * 400).astype(np.uint16)).save(bad)
    assert Image.open(bad).mode.startswith("I")
    _fails_before_training(capsys, tmp_path, folder_config(root), str(bad), "16-bit")


def test_images_of_different_sizes(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    odd = root / "test" / "bee" / "000.png"
    Image.new("RGB", (20, 12)).save(odd)
    _fails_before_training(capsys, tmp_path, folder_config(root), str(odd), "20x12", "share one size")


def test_train_and_test_classes_differ(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "test" / "cow").rename(root / "test" / "cat")
    _fails_before_training(capsys, tmp_path, folder_config(root), "only in train/: cow", "only in test/: cat")


def test_teacher_weights_for_another_class_count(capsys, tmp_path):
    """A 10-class teacher given for a 3-class folder: named file, both class counts, before training."""
    root = write_folder(tmp_path / "imgs")
    weights = tmp_path / "teacher10.safetensors"
    save_file(create_model("resnet18", num_classes=10, width=0.125).state_dict(), str(weights))
    cfg = folder_config(root, stages="Q:1", teacher={"epochs": 0, "weights": str(weights)})
    _fails_before_training(
        capsys, tmp_path, cfg, str(weights), "10 outputs at 'fc.weight'", "3 classes (ant, bee, cow)"
    )


def test_teacher_weights_for_another_width(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    weights = tmp_path / "wide.safetensors"
    save_file(create_model("resnet18", num_classes=3, width=0.25).state_dict(), str(weights))
    cfg = folder_config(root, stages="Q:1", teacher={"epochs": 0, "weights": str(weights)})
    _fails_before_training(capsys, tmp_path, cfg, str(weights), "does not fit model 'resnet18'")


def test_more_batch_than_images_is_refused(capsys, tmp_path):
    """drop_last on a train split smaller than one batch made every epoch a silent no-op."""
    root = write_folder(tmp_path / "imgs", n_train=2)
    _fails_before_training(
        capsys, tmp_path, folder_config(root, train={"batch_size": 8}), "train.batch_size", "6 training images"
    )


def test_grey_rgba_and_palette_images_are_converted_and_run(capsys, tmp_path):
    """Non-RGB 8-bit images (L, RGBA, P) are a documented conversion, not an error: the run completes."""
    root = write_folder(tmp_path / "imgs", classes=("ant", "bee"), mode="L")
    write_folder(
        tmp_path / "imgs", classes=("ant", "bee"), mode="RGBA", seed=1, n_train=2, n_test=1
    )  # overwrites some files
    Image.open(root / "train" / "bee" / "003.png").convert("P").save(root / "train" / "bee" / "003.png")
    out = tmp_path / "run"
    cfg = folder_config(root, stages="Q:0", quantize={"mode": "ptq", "calibration_batches": 1})
    assert main(["run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out), "--quiet"]) == 0
    m = read_metrics(out)
    assert m["num_classes"] == 2 and m["final_form"] == "int8"


def test_one_class_folder_is_refused_before_training(capsys, tmp_path):
    root = write_folder(tmp_path / "imgs")
    for split in ("train", "test"):
        for d in sorted((root / split).iterdir())[1:]:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    _fails_before_training(capsys, tmp_path, folder_config(root), "one class folder", "at least 2 classes")


def test_archive_member_too_big_for_an_image_is_refused_unread(capsys, tmp_path):
    import io

    src = write_folder(tmp_path / "imgs")
    arc = tmp_path / "imgs.tar.gz"
    with tarfile.open(arc, "w:gz", compresslevel=1) as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
        info = tarfile.TarInfo("train/ant/huge.png")
        info.size = (64 << 20) + 1
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    _fails_before_training(capsys, tmp_path, folder_config(arc), "train/ant/huge.png is 67,108,865 bytes", "64 MiB")
