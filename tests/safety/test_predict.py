"""Deployables carry their preprocessing and class names; `pqd predict`
runs the deployed file on raw images the way a user would."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from pqd.commands.predict import load_deployable, predict_files, predict_main
from pqd.config import DataConfig, TrainConfig
from pqd.data import batches, load_data
from pqd.deploy.deployable import (
    Preprocessed,
    deployable_meta,
    deployable_torchscript,
    normalized_callable,
    read_torchscript_meta,
    save_torchscript,
)
from pqd.errors import CheckpointError
from pqd.train.loop import train


@pytest.fixture(scope="module")
def digits_model():
    data = load_data(DataConfig(dataset="digits", train_subset=600, test_subset=64))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    train(model, data, epochs=3, lr=0.1, config=TrainConfig(batch_size=32, progress=False))
    return model.eval(), data


def normalised_logits(model, data):
    x, _ = next(iter(batches(data.test, batch_size=len(data.test), mean=data.mean, std=data.std)))
    with torch.no_grad():
        return model(x)


def test_wrapper_on_raw_uint8_matches_bare_model_on_normalised(digits_model):
    model, data = digits_model
    ref = normalised_logits(model, data)
    wrapped = Preprocessed(model, data.mean, data.std, data.test.classes).eval()
    with torch.no_grad():
        raw_u8 = wrapped(data.test.x)
        raw_f = wrapped(data.test.x.float() / 255)
        bare_on_01 = model(data.test.x.float() / 255)  # the mistake: the bare file fed [0,1] images
    assert torch.equal(raw_u8, ref)  # the loader's arithmetic exactly
    assert torch.equal(raw_f.argmax(1), ref.argmax(1))
    y = data.test.y
    # the trained model is better than chance on normalised input, and the bare model on [0,1] is worse
    assert (ref.argmax(1) == y).float().mean() > (bare_on_01.argmax(1) == y).float().mean()
    assert (bare_on_01.argmax(1) == ref.argmax(1)).float().mean() < 0.9
    assert wrapped.class_names == [str(i) for i in range(10)]


def _meta(data):
    return deployable_meta(mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape)


def test_torchscript_file_carries_preprocessing(digits_model, tmp_path: Path):
    model, data = digits_model
    path = save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        tmp_path / "model_fp32.pt",
        meta=_meta(data),
    )
    meta = read_torchscript_meta(path)  # from the zip, the model is not loaded
    assert (
        meta["mean"] == list(data.mean) and meta["class_names"][3] == "3" and meta["input"]["normalization"] == "inside"
    )
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(data.test.x).argmax(1), normalised_logits(model, data).argmax(1))
        assert torch.equal(loaded(data.test.x.float() / 255).argmax(1), normalised_logits(model, data).argmax(1))
    assert list(loaded.class_names) == list(data.test.classes)


def test_int8_deployable_takes_raw_images(digits_model, tmp_path: Path):
    from pqd.compress.qat import prepare
    from pqd.compress.student import Student, convert_student

    model, data = digits_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, torch.zeros(2, *data.image_shape), mode="ptq").eval()
        for x, _ in batches(data.train.subset(torch.arange(128)), batch_size=64, mean=data.mean, std=data.std):
            prepared(x)
        int8 = convert_student(Student(prepared, {}, "ptq"))
        ts = deployable_torchscript(
            int8, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        )
    path = save_torchscript(ts, tmp_path / "model_int8.pt", meta=_meta(data) | {"form": "int8"})
    ref = normalised_logits(int8, data)
    loaded = torch.jit.load(str(path))
    x_norm, _ = next(iter(batches(data.test, batch_size=len(data.test), mean=data.mean, std=data.std)))
    with torch.no_grad():
        assert torch.equal(loaded(data.test.x), ref)
        assert torch.equal(normalized_callable(loaded)(x_norm), ref)  # pqd's own evaluation entry
        assert normalized_callable(int8) is int8
    dep = load_deployable(tmp_path)  # the run folder
    assert dep.path.name == "model_int8.pt" and dep.meta["form"] == "int8"


def _write_pngs(data, folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(data.test.x[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def test_predict_files_and_cli(digits_model, tmp_path: Path, capsys):
    model, data = digits_model
    run = tmp_path / "run"
    save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        run / "model_int8.pt",
        meta=_meta(data),
    )
    images = _write_pngs(data, tmp_path / "imgs", 12)
    out = predict_files(run, images, top_k=3)
    ref = normalised_logits(model, data)[:12]
    assert [r["class"] for r in out] == [str(int(i)) for i in ref.argmax(1)]
    probs = torch.softmax(ref, 1).max(1).values
    assert all(abs(r["probability"] - float(p)) < 1e-5 for r, p in zip(out, probs, strict=True))
    assert len(out[0]["top"]) == 3 and out[0]["top"][0]["probability"] >= out[0]["top"][1]["probability"]
    # a bigger, non-square image is resized and centre-cropped to 32x32
    Image.fromarray(data.test.x[0].permute(1, 2, 0).numpy()).resize((96, 64)).save(tmp_path / "big.jpg")
    assert predict_files(run, [tmp_path / "big.jpg"])[0]["class"] in data.test.classes

    assert predict_main([str(run), str(tmp_path / "imgs"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in printed] == [r["class"] for r in out]
    assert predict_main([str(run), str(images[0])]) == 0
    assert capsys.readouterr().out.startswith(f"{images[0]}\t")
    assert predict_main([str(run), str(tmp_path / "missing.png")]) == 2
    assert "missing.png' does not exist" in capsys.readouterr().err
    (tmp_path / "notimg.png").write_text("hello")
    assert predict_main([str(run), str(tmp_path / "notimg.png")]) == 2
    assert "cannot be used" in capsys.readouterr().err


def test_bad_deployables(digits_model, tmp_path: Path):
    model, data = digits_model
    good = save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        tmp_path / "a.pt",
        meta=_meta(data),
    )
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_deployable(truncated)
    bare = tmp_path / "bare" / "model_int8.pt"
    bare.parent.mkdir()
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(bare))  # an older pqd's file
    with pytest.raises(CheckpointError, match="carries no preprocessing record"):
        load_deployable(bare.parent)
    with pytest.raises(CheckpointError, match="holds no deployable model"):
        load_deployable(tmp_path / "imgs_none" if (tmp_path / "imgs_none").mkdir() is None else None)


def test_onnx_deployable_with_normalisation_inside(digits_model, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from pqd.deploy.deployable import onnx_metadata
    from pqd.deploy.onnx import export_onnx

    model, data = digits_model
    wrapped = Preprocessed(model, data.mean, data.std, data.test.classes).eval()
    meta = _meta(data)
    meta["input"]["dtype"] = "float32 [0, 1]"  # exported with a float example: the float branch
    export_onnx(wrapped, tmp_path / "model_fp32.onnx", data.image_shape, metadata=onnx_metadata(meta))
    images = _write_pngs(data, tmp_path / "imgs", 8)
    out = predict_files(tmp_path / "model_fp32.onnx", images)
    ref = normalised_logits(model, data)[:8].argmax(1)
    assert [r["class"] for r in out] == [str(int(i)) for i in ref]


def test_sixteen_bit_images_are_refused_like_training_does(digits_model, tmp_path: Path, capsys):
    """PIL's convert clips 16-bit grey to 0/255: predict gave wrong classes silently. The training
    loader's rule applies: refused, naming the file."""
    import numpy as np

    from pqd.errors import DataError

    model, data = digits_model
    run = tmp_path / "run"
    save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        run / "model_int8.pt",
        meta=_meta(data),
    )
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(1024).reshape(32, 32) * 60).astype(np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(DataError, match=r"deep.png' has I;16 pixels \(16-bit or floating point\)"):
        predict_files(run, [deep])
    assert predict_main([str(run), str(deep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pqd: error: image") and "16-bit" in err and "Traceback" not in err


@pytest.mark.parametrize("k", ["0", "-1", "x"])
def test_top_k_below_one_is_refused(digits_model, tmp_path: Path, capsys, k):
    from pqd.errors import ConfigError

    model, data = digits_model
    run = tmp_path / "run"
    save_torchscript(
        deployable_torchscript(
            model, mean=data.mean, std=data.std, class_names=data.test.classes, input_shape=data.image_shape
        ),
        run / "model_int8.pt",
        meta=_meta(data),
    )
    images = _write_pngs(data, tmp_path / "imgs", 1)
    with pytest.raises(SystemExit) as exc:
        predict_main([str(run), str(images[0]), "--top-k", k])
    assert exc.value.code == 2 and "--top-k: expected a whole number of classes, 1 or more" in capsys.readouterr().err
    if k != "x":
        with pytest.raises(ConfigError, match="top_k"):
            predict_files(run, images, top_k=int(k))
