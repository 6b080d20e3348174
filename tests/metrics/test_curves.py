import pytest
import torch
from torch import nn

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import deletion_curve, insertion_curve, masking_test, pixel_ranks

from .literal import deletion_literal, order_literal


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()


def _data(n=3, h=8, w=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64)
    maps = torch.randint(0, 6, (n, h, w), generator=g).double()  # ties: row-major order
    return x, maps


@pytest.mark.parametrize("insertion", [False, True])
@pytest.mark.parametrize("steps", [4, 9])
def test_curves_equal_literal(insertion, steps):
    model = _model().train()
    x, maps = _data()
    base = torch.randn(3, 3, 8, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fn = insertion_curve if insertion else deletion_curve
    target = torch.tensor([0, 3, 1])
    curve = fn(model, x, maps, target, baseline=base, steps=steps, batch_size=5)
    assert model.training  # restored
    model.eval()
    assert curve.scores.shape == (3, steps + 1)
    for m in range(3):

        def probs(img):
            with torch.no_grad():
                return model(torch.as_tensor(img)[None]).softmax(1)[0]

        scores, area = deletion_literal(
            probs, x[m].numpy(), maps[m].tolist(), int(target[m]), base[m].numpy(), steps, insertion
        )
        torch.testing.assert_close(
            curve.scores[m], torch.tensor(scores, dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert curve.auc[m].item() == pytest.approx(area, abs=1e-6)


def test_linear_model_hand_computed_curves():
    # logit = sum of all pixels; image of ones, baseline 0, 4 pixels, 4 steps
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    nn.init.ones_(lin[1].weight)
    x = torch.ones(1, 1, 2, 2)
    heat = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
    dele = deletion_curve(lin, x, heat, 0, steps=4, score="logit")
    assert dele.scores.tolist() == [[4.0, 3.0, 2.0, 1.0, 0.0]]
    assert dele.auc.item() == pytest.approx(2.0)
    ins = insertion_curve(lin, x, heat, 0, steps=4, score="logit")
    assert ins.scores.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    assert dele.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # order of removal follows the heatmap: weight the pixels to see it
    lin[1].weight.data = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    dele = deletion_curve(lin, x, heat, 0, steps=4, score="logit")
    # removal order: 0.4 (x=1 -> 10), 0.3 (100), 0.2 (1000), 0.1 (1)
    assert dele.scores.tolist() == [[1111.0, 1101.0, 1001.0, 1.0, 0.0]]


def test_baseline_forms_and_multiple_maps():
    model = _model()
    x, maps = _data()
    blur = lambda t: torch.nn.functional.avg_pool2d(t, 3, 1, 1)  # noqa: E731
    a = deletion_curve(model, x, maps, 1, baseline=blur, steps=5)
    b = deletion_curve(model, x, maps, 1, baseline=blur(x), steps=5)
    torch.testing.assert_close(a.scores, b.scores)
    c = deletion_curve(
        model, x, maps, 1, baseline=torch.tensor([0.5, 0.0, -0.5]).view(3, 1, 1).double(), steps=5
    )
    assert c.scores.shape == (3, 6)
    two = torch.stack([maps, -maps], 1)
    d = deletion_curve(model, x, two, 1, steps=5, batch_size=4)
    assert d.scores.shape == (3, 2, 6)
    torch.testing.assert_close(d.scores[:, 0], deletion_curve(model, x, maps, 1, steps=5).scores)
    with pytest.raises(InputError, match="broadcast"):
        deletion_curve(model, x, maps, 1, baseline=torch.zeros(2, 2))
    with pytest.raises(InputError, match="resize"):
        deletion_curve(model, x, maps[:, :4], 1)
    with pytest.raises(InputError, match="steps"):
        deletion_curve(model, x, maps, 1, steps=0)


def test_masking_test_equals_literal():
    model = _model()
    model.eval()
    x, maps = _data(n=5)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[0] = (labels[0] + 1) % 5
    fill = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1)
    res = masking_test(model, x, maps, labels, [0, 5, 20, 56], fill=fill, batch_size=7)
    assert res.correct.shape == (5, 4) and res.accuracy.shape == (4,)
    for m in range(5):
        order = order_literal(maps[m].tolist())
        for li, n_keep in enumerate([0, 5, 20, 56]):
            img = fill.expand(3, 8, 7).clone()
            for i, j in order[:n_keep]:
                img[:, i, j] = x[m, :, i, j]
            with torch.no_grad():
                ok = bool(model(img[None]).argmax(1)[0] == labels[m])
            assert bool(res.correct[m, li]) == ok
    assert res.accuracy[-1] == pytest.approx(
        0.8
    )  # every pixel kept: the label flip is the only error
    # per-x-feature maps and an inpainting callable that sees the keep mask
    seen = []

    def inpaint(images, keep):
        seen.append(int(keep.sum()))
        return images

    two = masking_test(model, x, torch.stack([maps, maps], 1), labels, [5], inpaint=inpaint)
    assert two.accuracy.shape == (2, 1) and sum(seen) == 5 * 2 * 5
    with pytest.raises(InputError, match="n_pixels"):
        masking_test(model, x, maps, labels, [57])


def test_pixel_ranks_ties_row_major():
    heat = torch.tensor([[[1.0, 2.0], [2.0, 0.0]]])
    assert pixel_ranks(heat).tolist() == [[[2, 0], [1, 3]]]
