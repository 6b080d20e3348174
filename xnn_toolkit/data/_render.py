"""Vectorised renderer of the synthetic birds: analytic parts, warped label maps.

**Bird frame.** A bird is built from analytic shapes (ellipses, disc sectors, tapered
strips, bands) in its own frame ``(u, v)``: it faces ``+u``, ``v`` points down, the origin
is the body centre and the unit is about one body length. Each species' *shape* (its beak,
tail and wing pattern) is evaluated once on a fine grid of that frame into a label map of
*layers* (:data:`LAYER_NAMES`), painted far to near: a template.

**Pose.** Image pixel centres ``(x, y)`` (integer coordinates, ``x`` = column, ``y`` =
row) map into the bird frame by one affine transform per image::

    f u = ((x - o_x) cos a + (y - o_y) sin a) / s_u
      v = (-(x - o_x) sin a + (y - o_y) cos a) / s_v

(scales ``s_u, s_v`` in pixels per unit, rotation ``a`` clockwise on screen, origin ``o``,
``f = -1`` for a mirrored bird), and each pixel takes the template's layer at the nearest
texel. Distractors (ellipses, boxes, triangles) are drawn the same way from unit shape
templates and occluders are bands across the image. Because layer ids are numbered in
painter's order (background < distractors < bird parts far to near < occluders), drawing
one thing over another is an element-wise maximum, and a whole batch costs a few dozen
tensor operations.

**Annotations** are all read from the final layer map, so they agree with the pixels:

- ``part_mask`` shows a part only where it is visible (not hidden by a nearer part of the
  bird, not under an occluder, inside the image);
- ``object_mask`` is the union of the bird's visible pixels;
- ``bbox`` is the tight box of the bird's silhouette *before* occluders are drawn (the box
  an annotator draws around a partly hidden bird), clipped to the image;
- a keypoint is visible iff the pixel nearest to it (``round(x), round(y)``) lies inside
  the image and shows that very part in ``part_mask``.

**Sides.** The bird is seen in profile. Facing ``+u`` (to the right when not mirrored) it
shows its *right* side: the near wing, eye and leg are the right ones; mirrored, it faces
left and the near ones are the left ones. The far eye is always hidden by the head (its
keypoint lies just behind the near eye and is never visible); the far wing peeks above the
back and the far leg shows beside the near one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._species import PART_NAMES

_P = {name: p for p, name in enumerate(PART_NAMES)}

# Bird geometry in its own frame (units; +u forward, +v down).
_BODY = (0.45, 0.29)  # semi-axes, centred at the origin
_BACK_LINE = -0.04  # body above this v is back
_BREAST_LINE = 0.12  # body below the back line and in front of this u is breast
_HEAD = (0.44, -0.27, 0.21)  # centre u, v and radius
# Head sectors, angles in degrees counter-clockwise from +u on screen (i.e. towards -v).
_FOREHEAD_DEG = (10.0, 65.0)
_CROWN_DEG = (65.0, 150.0)
_NAPE_DEG = (150.0, 240.0)  # the throat takes the rest
_EYE = (
    _HEAD[0] + 0.42 * _HEAD[2] * math.cos(math.radians(10)),
    _HEAD[1] - 0.42 * _HEAD[2] * math.sin(math.radians(10)),
    0.055,
)
_BEAK_BASE = (0.63, -0.245)
_BEAK_DOWN_DEG = 8.0  # the beak points this much below +u
_TAIL_BASE = (-0.40, -0.05)
_TAIL_UP_DEG = 12.0  # the tail points backwards, this much above -u
_WING_NEAR = (-0.08, -0.03)
_WING_FAR = (-0.05, -0.29)
_WING_AXES = (0.34, 0.15)
_WING_TILT_DEG = 12.0  # the wing tip (rear) is raised
_WING_PERIOD = 0.2  # bars and spots repeat along the wing every this many units
_LEG_TOP, _LEG_BOTTOM = 0.12, 0.47
_LEG_NEAR_U, _LEG_FAR_U = 0.05, -0.07  # where each leg leaves the body
_LEG_LEAN = 0.125  # u shift per unit of v
_LEG_HALF_WIDTH = 0.04
_FOOT_HALF_HEIGHT = 0.03
_FOOT_REACH = (-0.03, 0.11)  # toes extend from the ankle backwards / forwards
_KNEE_V = 0.39  # leg keypoints sit at this height

# Extent of every template (bird frame), and the point the pose places in the image.
_FRAME_U = (-1.1, 1.15)
_FRAME_V = (-0.6, 0.6)
OBJECT_CENTRE = (0.05, 0.0)
OBJECT_HALF_EXTENT = (0.80, 0.49)

# Layers in painter's order (a later layer hides an earlier one).
LAYER_NAMES = (
    "background",
    "distractor0",
    "distractor1",
    "distractor2",
    "far wing",
    "far wing mark",
    "far leg",
    "near leg",
    "tail",
    "belly",
    "back",
    "breast",
    "near wing",
    "near wing mark",
    "throat",
    "nape",
    "crown",
    "forehead",
    "beak",
    "near eye",
    "occluder0",
    "occluder1",
)
LAYER = {name: k for k, name in enumerate(LAYER_NAMES)}
NUM_LAYERS = len(LAYER_NAMES)
NUM_DISTRACTORS = 3
NUM_OCCLUDERS = 2

# Colour slot (see _species.COLOUR_SLOTS) of each bird layer.
BIRD_LAYER_SLOTS = {
    "far wing": "wing",
    "far wing mark": "wing_mark",
    "far leg": "leg",
    "near leg": "leg",
    "tail": "tail",
    "belly": "belly",
    "back": "back",
    "breast": "breast",
    "near wing": "wing",
    "near wing mark": "wing_mark",
    "throat": "throat",
    "nape": "nape",
    "crown": "crown",
    "forehead": "forehead",
    "beak": "beak",
    "near eye": "eye",
}

# Part of each bird layer; sided ones are right when the bird is not mirrored and "near".
_LAYER_PART = {
    "tail": "tail",
    "belly": "belly",
    "back": "back",
    "breast": "breast",
    "throat": "throat",
    "nape": "nape",
    "crown": "crown",
    "forehead": "forehead",
    "beak": "beak",
}
_SIDED_LAYER = {
    "far wing": ("far", "wing"),
    "far wing mark": ("far", "wing"),
    "far leg": ("far", "leg"),
    "near leg": ("near", "leg"),
    "near wing": ("near", "wing"),
    "near wing mark": ("near", "wing"),
    "near eye": ("near", "eye"),
}

# Distractor shapes in their unit square [-1, 1]^2.
DISTRACTOR_SHAPES = ("ellipse", "box", "triangle")


@dataclass(frozen=True)
class BirdShape:
    """The geometry that varies between species (see ``_species``).

    ``beak`` is ``(length, base half-width, hook)``, ``tail`` is ``(length, base
    half-width, end half-width, fork depth, point depth)``, ``wing_pattern`` is 0 (plain),
    1 (bars) or 2 (spots).
    """

    beak: tuple[float, float, float]
    tail: tuple[float, float, float, float, float]
    wing_pattern: int


@dataclass
class Templates:
    """Label maps of bird shapes and of distractor shapes, with their keypoints.

    Attributes
    ----------
    birds : Tensor
        ``M x Ht x Wt`` uint8 layer ids of ``M`` bird shapes; the border texels are 0.
    res : float
        Texels per bird unit; texel ``(i, j)`` is at ``u = u0 + j / res, v = v0 + i / res``.
    u0, v0 : float
        Bird-frame position of texel ``(0, 0)``.
    keypoints : Tensor
        ``M x P x 2`` float32 ``(u, v)`` of every part of each shape, unmirrored naming.
    shapes : Tensor
        ``NUM_DISTRACTORS * (len(DISTRACTOR_SHAPES) + 1) x Hs x Hs`` uint8: for distractor
        slot ``k`` and shape ``s`` (the last one empty), the map holds ``k + 1`` inside.
    shape_res : float
        Texels per half side of the distractor unit square.
    """

    birds: torch.Tensor
    res: float
    u0: float
    v0: float
    keypoints: torch.Tensor
    shapes: torch.Tensor
    shape_res: float

    def to(self, device: torch.device) -> Templates:
        """The same templates on ``device``."""
        return Templates(
            self.birds.to(device),
            self.res,
            self.u0,
            self.v0,
            self.keypoints.to(device),
            self.shapes.to(device),
            self.shape_res,
        )


@dataclass
class Scene:
    """Everything needed to draw ``N`` images (tensors on one device, leading ``N``).

    Attributes
    ----------
    shape : Tensor
        ``N`` int64 index of the bird template.
    scale : Tensor
        ``N x 2`` pixels per bird unit along ``u`` and ``v``.
    angle : Tensor
        ``N`` rotation in radians (clockwise on screen).
    flip : Tensor
        ``N`` bool, bird mirrored (faces left).
    origin : Tensor
        ``N x 2`` pixel position ``(x, y)`` of the bird frame's origin.
    colours : Tensor
        ``N x NUM_LAYERS x 3`` flat colour of each layer; layer 0 is the background's
        first colour.
    background : Tensor
        ``N x 3`` background's second colour, mixed in by the gratings.
    grating : Tensor
        ``N x 2 x 3`` two gratings ``(k_x, k_y, phase)`` in radians per pixel and radians;
        all zero gives a flat background of the first colour.
    noise_offset : Tensor
        ``N x 2`` int64 offset ``(x, y)`` into the noise tile.
    noise_amplitude : Tensor
        ``N`` multiplier of the noise tile (0 = no noise).
    distractors : Tensor
        ``N x NUM_DISTRACTORS x 6``: centre x, centre y, half width, half height (pixels),
        angle (rad), and shape index into :data:`DISTRACTOR_SHAPES` (3 = none).
    occluders : Tensor
        ``N x NUM_OCCLUDERS x 4``: point x, point y (pixels), angle (rad), half width
        (pixels; negative = no occluder).
    """

    shape: torch.Tensor
    scale: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    origin: torch.Tensor
    colours: torch.Tensor
    background: torch.Tensor
    grating: torch.Tensor
    noise_offset: torch.Tensor
    noise_amplitude: torch.Tensor
    distractors: torch.Tensor
    occluders: torch.Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])


@dataclass
class Drawn:
    """Output of :func:`draw`, on the scene's device.

    Attributes
    ----------
    images : Tensor
        ``N x 3 x H x W`` float32 in ``[0, 1]``.
    part_mask : Tensor
        ``N x H x W`` int64, ``0`` = no part, ``p + 1`` = part ``p``.
    object_mask : Tensor
        ``N x H x W`` bool, visible bird pixels.
    keypoints : Tensor
        ``N x P x 2`` float32 ``(x, y)`` pixels.
    visible : Tensor
        ``N x P`` bool.
    bbox : Tensor
        ``N x 4`` float32 ``(x0, y0, x1, y1)``, inclusive pixel indices.
    """

    images: torch.Tensor
    part_mask: torch.Tensor
    object_mask: torch.Tensor
    keypoints: torch.Tensor
    visible: torch.Tensor
    bbox: torch.Tensor


# ---------------------------------------------------------------------------- templates
def _sector(dx: torch.Tensor, dy: torch.Tensor, deg: tuple[float, float]) -> torch.Tensor:
    """Points whose angle ``atan2(dy, dx)`` lies in ``deg`` (a range narrower than 180)."""
    a, b = math.radians(deg[0]), math.radians(deg[1])
    # cross(ray_a, p) >= 0 and cross(p, ray_b) >= 0
    ccw_of_a = (dy * math.cos(a) - dx * math.sin(a)) >= 0
    cw_of_b = (dx * math.sin(b) - dy * math.cos(b)) >= 0
    return ccw_of_a & cw_of_b


def paint_bird(u: torch.Tensor, v: torch.Tensor, shape: BirdShape) -> torch.Tensor:
    """Layer ids of a bird of ``shape`` at bird-frame points ``(u, v)``.

    Parameters
    ----------
    u, v : Tensor
        Bird-frame coordinates, any equal shape.
    shape : BirdShape
        Beak, tail and wing pattern.

    Returns
    -------
    Tensor
        uint8 of the same shape: the nearest layer at each point (0 = no bird).
    """
    lab = torch.zeros(u.shape, dtype=torch.uint8, device=u.device)
    L = LAYER

    # Wings: ellipses tilted tip-up; the pattern field is shared by both wings.
    ct, st = math.cos(math.radians(_WING_TILT_DEG)), math.sin(math.radians(_WING_TILT_DEG))
    wa, wb = _WING_AXES

    def wing(cu: float, cv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        du, dv = u - cu, v - cv
        wu = du * ct - dv * st
        wv = du * st + dv * ct
        return (wu / wa) ** 2 + (wv / wb) ** 2 <= 1.0, wu, wv

    far, _, _ = wing(*_WING_FAR)
    near, wu, wv = wing(*_WING_NEAR)
    pos = torch.remainder(wu / _WING_PERIOD + 0.25, 1.0)
    if shape.wing_pattern == 1:  # bars across the wing
        mark = pos < 0.42
    elif shape.wing_pattern == 2:  # spots along its mid line
        mark = ((pos - 0.5) * _WING_PERIOD) ** 2 + wv**2 <= 0.065**2
    else:
        mark = torch.zeros_like(near)
    mark &= wu < 0.6 * wa  # the wing's shoulder stays plain
    lab[far] = L["far wing"]
    lab[far & mark] = L["far wing mark"]

    # Legs with toes pointing forward, behind the body.
    for name, u0 in (("far leg", _LEG_FAR_U), ("near leg", _LEG_NEAR_U)):
        lu = u - (u0 - _LEG_LEAN * _LEG_TOP) - _LEG_LEAN * v
        leg = (lu.abs() <= _LEG_HALF_WIDTH) & (v >= _LEG_TOP) & (v <= _LEG_BOTTOM)
        du = u - (u0 + _LEG_LEAN * (_LEG_BOTTOM - _LEG_TOP))
        foot = ((v - _LEG_BOTTOM).abs() <= _FOOT_HALF_HEIGHT) & (du >= _FOOT_REACH[0])
        lab[leg | (foot & (du <= _FOOT_REACH[1]))] = L[name]

    # Tail: a strip tapering from w0 to w1 along its axis, end forked or pointed:
    # inside iff |q| <= w_t and t <= L - fork (1 - |q| / w_t) - point |q| / w_t.
    length, w0, w1, fork, point = shape.tail
    da = math.radians(_TAIL_UP_DEG)
    du, dv = u - _TAIL_BASE[0], v - _TAIL_BASE[1]
    t = -du * math.cos(da) - dv * math.sin(da)
    aq = (du * math.sin(da) - dv * math.cos(da)).abs()
    wt = w0 + (w1 - w0) * (t / length)
    end = length * wt - fork * (wt - aq) - point * aq  # the end condition times w_t > 0
    lab[(aq <= wt) & (t >= -0.1) & (t * wt <= end)] = L["tail"]

    # Body: belly, then back above the back line, breast in front below it.
    body = (u / _BODY[0]) ** 2 + (v / _BODY[1]) ** 2 <= 1.0
    upper = v < _BACK_LINE
    lab[body] = L["belly"]
    lab[body & upper] = L["back"]
    lab[body & ~upper & (u > _BREAST_LINE)] = L["breast"]

    lab[near] = L["near wing"]
    lab[near & mark] = L["near wing mark"]

    # Head: a disc cut into sectors around its centre.
    hx, hy, hr = _HEAD
    dx, dy = u - hx, hy - v  # dy points up on screen
    head = dx * dx + dy * dy <= hr * hr
    lab[head] = L["throat"]
    lab[head & _sector(dx, dy, _NAPE_DEG)] = L["nape"]
    lab[head & _sector(dx, dy, _CROWN_DEG)] = L["crown"]
    lab[head & _sector(dx, dy, _FOREHEAD_DEG)] = L["forehead"]

    # Beak: a strip tapering to a point, its centre line bent down by the hook:
    # inside iff 0 <= t <= L and |q - h t^2 / L| <= w (1 - t / L).
    length, half, hook = shape.beak
    ca, sa = math.cos(math.radians(_BEAK_DOWN_DEG)), math.sin(math.radians(_BEAK_DOWN_DEG))
    du, dv = u - _BEAK_BASE[0], v - _BEAK_BASE[1]
    t = du * ca + dv * sa
    q = dv * ca - du * sa - hook * t * t / length
    lab[(t >= -0.06) & (t <= length) & (q.abs() <= half * (1.0 - t / length))] = L["beak"]

    ex, ey, er = _EYE
    lab[(u - ex) ** 2 + (v - ey) ** 2 <= er * er] = L["near eye"]
    return lab


def _head_point(deg: float, frac: float) -> tuple[float, float]:
    hx, hy, hr = _HEAD
    a = math.radians(deg)
    return hx + frac * hr * math.cos(a), hy - frac * hr * math.sin(a)


def bird_keypoints(shape: BirdShape) -> torch.Tensor:
    """``P x 2`` keypoints ``(u, v)`` of a bird of ``shape``, not mirrored (near = right).

    Each keypoint lies well inside its part, away from the parts drawn over it.
    """
    kp = {
        "back": (0.02, -0.21),
        "breast": (0.30, 0.08),
        "belly": (-0.08, 0.19),
        "crown": _head_point(105.0, 0.62),
        "forehead": _head_point(40.0, 0.75),
        "nape": _head_point(195.0, 0.60),
        "throat": _head_point(300.0, 0.60),
        "right eye": (_EYE[0], _EYE[1]),
        "left eye": (_EYE[0] + 0.03, _EYE[1] - 0.01),  # behind the head
        "right wing": _WING_NEAR,
        "left wing": (_WING_FAR[0] - 0.05, _WING_FAR[1] - 0.065),  # the part above the back
        "right leg": (_LEG_NEAR_U + _LEG_LEAN * (_KNEE_V - _LEG_TOP), _KNEE_V),
        "left leg": (_LEG_FAR_U + _LEG_LEAN * (_KNEE_V - _LEG_TOP), _KNEE_V),
    }
    # Beak: 30 % along its centre line.
    length, _, hook = shape.beak
    t = 0.3 * length
    q = hook * t * t / length
    ca, sa = math.cos(math.radians(_BEAK_DOWN_DEG)), math.sin(math.radians(_BEAK_DOWN_DEG))
    kp["beak"] = (_BEAK_BASE[0] + t * ca - q * sa, _BEAK_BASE[1] + t * sa + q * ca)
    # Tail: half-way between where it leaves the body and its (notched) end on the axis.
    length, _, _, fork, _ = shape.tail
    t = 0.5 * (0.08 + length - fork)
    da = math.radians(_TAIL_UP_DEG)
    kp["tail"] = (_TAIL_BASE[0] - t * math.cos(da), _TAIL_BASE[1] - t * math.sin(da))
    return torch.tensor([kp[name] for name in PART_NAMES], dtype=torch.float32)


def _paint_shapes(lu: torch.Tensor, lv: torch.Tensor) -> list[torch.Tensor]:
    """Distractor shapes in the unit square: ellipse, box, triangle (apex up), empty."""
    return [
        lu**2 + lv**2 <= 1.0,
        (lu.abs() <= 1.0) & (lv.abs() <= 1.0),
        (lv <= 1.0) & (lu.abs() <= 0.5 * (lv + 1.0)),
        torch.zeros_like(lu, dtype=torch.bool),
    ]


def make_templates(shapes: list[BirdShape], res: float, shape_res: int) -> Templates:
    """Evaluate bird shapes and distractor shapes on their template grids.

    Parameters
    ----------
    shapes : list of BirdShape
        ``M`` bird shapes.
    res : float
        Texels per bird unit (at least the largest image scale, for crisp edges).
    shape_res : int
        Texels per half side of the distractor unit square.
    """
    w = int(math.ceil((_FRAME_U[1] - _FRAME_U[0]) * res)) + 1
    h = int(math.ceil((_FRAME_V[1] - _FRAME_V[0]) * res)) + 1
    u = _FRAME_U[0] + torch.arange(w, dtype=torch.float32) / res
    v = _FRAME_V[0] + torch.arange(h, dtype=torch.float32) / res
    uu, vv = u[None, :].expand(h, w), v[:, None].expand(h, w)
    birds = torch.stack([paint_bird(uu, vv, s) for s in shapes])
    birds[:, [0, -1], :] = 0
    birds[:, :, [0, -1]] = 0
    keypoints = torch.stack([bird_keypoints(s) for s in shapes])

    n = 2 * shape_res + 3  # one empty texel on each side
    g = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / shape_res
    masks = _paint_shapes(g[None, :].expand(n, n), g[:, None].expand(n, n))
    shape_maps = torch.stack(
        [m.to(torch.uint8) * (k + 1) for k in range(NUM_DISTRACTORS) for m in masks]
    )
    shape_maps[:, [0, -1], :] = 0
    shape_maps[:, :, [0, -1]] = 0
    return Templates(
        birds, float(res), _FRAME_U[0], _FRAME_V[0], keypoints, shape_maps, float(shape_res)
    )


# ------------------------------------------------------------------------------ drawing
def _col(t: torch.Tensor) -> torch.Tensor:
    """``N`` -> ``N x 1 x 1`` for broadcasting against ``N x H x W``."""
    return t.reshape(-1, 1, 1)


def _plane(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a x + b y + c`` on the pixel grid: ``N x H x W`` from ``N``-vectors."""
    return (xs[None, None, :] * _col(a)) + (xs[None, :, None] * _col(b) + _col(c))


def _warp(
    maps: torch.Tensor,
    which: torch.Tensor,
    coef: torch.Tensor,
    xs: torch.Tensor,
) -> torch.Tensor:
    """Sample label maps at affine positions of the pixel grid (nearest texel).

    Texel column ``j = floor(a x + b y + c)`` and row ``i = floor(d x + e y + f)`` with
    ``coef = (a, b, c, d, e, f)`` (``N x 6``, the ``+ 0.5`` of rounding folded into ``c,
    f``); out-of-map positions read the maps' zero border.

    Returns
    -------
    Tensor
        ``N x H x W`` uint8 with ``H = W = len(xs)``.
    """
    _, h, w = maps.shape
    j = _plane(xs, coef[:, 0], coef[:, 1], coef[:, 2])
    i = _plane(xs, coef[:, 3], coef[:, 4], coef[:, 5])
    # Clamping in float first keeps huge coordinates from overflowing the integer cast;
    # the cast truncates, which is floor for the non-negative values left.
    j = j.clamp_(0, w - 1).to(torch.int32)
    i = i.clamp_(0, h - 1).to(torch.int32)
    flat = i.mul_(w).add_(j).add_(_col((which * (h * w)).to(torch.int32)))
    return torch.take(maps, flat.long())


def _bird_coefficients(scene: Scene, t: Templates) -> torch.Tensor:
    """Affine coefficients pixel -> template texel (``N x 6``, see :func:`_warp`)."""
    c, s = torch.cos(scene.angle), torch.sin(scene.angle)
    f = torch.where(scene.flip, -1.0, 1.0).to(c.dtype)
    ru = t.res * f / scene.scale[:, 0]
    rv = t.res / scene.scale[:, 1]
    ox, oy = scene.origin[:, 0], scene.origin[:, 1]
    a, b = ru * c, ru * s
    d, e = -rv * s, rv * c
    cc = -a * ox - b * oy - t.res * t.u0 + 0.5
    ff = -d * ox - e * oy - t.res * t.v0 + 0.5
    return torch.stack([a, b, cc, d, e, ff], dim=1)


def _to_pixels(scene: Scene, uv: torch.Tensor) -> torch.Tensor:
    """Bird frame ``N x K x 2`` -> pixels ``N x K x 2`` (inverse of the pose)."""
    a = scene.angle[:, None]
    fu = torch.where(scene.flip[:, None], -uv[..., 0], uv[..., 0]) * scene.scale[:, 0:1]
    v = uv[..., 1] * scene.scale[:, 1:2]
    x = scene.origin[:, 0:1] + fu * torch.cos(a) - v * torch.sin(a)
    y = scene.origin[:, 1:2] + fu * torch.sin(a) + v * torch.cos(a)
    return torch.stack([x, y], dim=-1)


def _mirror_sides(kp: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Swap left and right keypoints of mirrored birds (``N x P x 2``)."""
    perm = list(range(len(PART_NAMES)))
    for p, name in enumerate(PART_NAMES):
        for a, b in (("left ", "right "), ("right ", "left ")):
            if name.startswith(a):
                perm[p] = _P[b + name[len(a) :]]
    return torch.where(flip[:, None, None], kp[:, perm], kp)


def _layer_parts(flip: torch.Tensor) -> torch.Tensor:
    """``N x NUM_LAYERS`` int64: part index + 1 shown by each layer (0 for non-bird)."""
    table = torch.zeros(flip.shape[0], NUM_LAYERS, dtype=torch.long, device=flip.device)
    for layer, part in _LAYER_PART.items():
        table[:, LAYER[layer]] = _P[part] + 1
    for layer, (side, kind) in _SIDED_LAYER.items():
        plain = _P[("right " if side == "near" else "left ") + kind] + 1
        mirrored = _P[("left " if side == "near" else "right ") + kind] + 1
        table[:, LAYER[layer]] = torch.where(flip, mirrored, plain)
    return table


def _bbox(mask: torch.Tensor) -> torch.Tensor:
    """Tight inclusive boxes ``N x 4`` of ``N x H x W`` masks (zeros where empty)."""
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    big = max(mask.shape[1], mask.shape[2])
    ar_h = torch.arange(mask.shape[1], device=mask.device)
    ar_w = torch.arange(mask.shape[2], device=mask.device)
    box = torch.stack(
        [
            torch.where(cols, ar_w, big).amin(dim=1),
            torch.where(rows, ar_h, big).amin(dim=1),
            torch.where(cols, ar_w, -1).amax(dim=1),
            torch.where(rows, ar_h, -1).amax(dim=1),
        ],
        dim=1,
    ).float()
    return torch.where(rows.any(dim=1)[:, None], box, torch.zeros_like(box))


def _separable_sin(
    kx: torch.Tensor, ky: torch.Tensor, ph: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """``sin(kx x + ky y + ph)`` on the grid as ``sin(kx x) cos(ky y + ph) + cos(kx x) sin(..)``."""
    ax = xs[None, :] * kx[:, None]  # N x W
    ay = xs[None, :] * ky[:, None] + ph[:, None]  # N x H
    sx, cx = torch.sin(ax)[:, None, :], torch.cos(ax)[:, None, :]
    return sx * torch.cos(ay)[:, :, None] + cx * torch.sin(ay)[:, :, None]


def draw(scene: Scene, size: int, templates: Templates, noise_tile: torch.Tensor) -> Drawn:
    """Render a batch of scenes.

    Parameters
    ----------
    scene : Scene
        ``N`` scenes, all tensors on the device to render on.
    size : int
        Image height and width ``H = W`` in pixels.
    templates : Templates
        Bird and distractor templates on the same device.
    noise_tile : Tensor
        ``T x T`` float32 zero-mean noise on the same device, ``T >= size``; each image
        adds a crop of it (at ``scene.noise_offset``, wrapping) times its amplitude.

    Returns
    -------
    Drawn
        Images, masks, keypoints, visibility and boxes (see the module docstring for the
        exact definitions).
    """
    dev = scene.shape.device
    n = len(scene)
    xs = torch.arange(size, device=dev, dtype=torch.float32)

    # Distractors, then the bird over them (layer ids are in painter's order).
    lab = torch.zeros(n, size, size, dtype=torch.uint8, device=dev)
    nshape = len(DISTRACTOR_SHAPES) + 1
    sr = templates.shape_res
    centre = (templates.shapes.shape[-1] - 1) / 2 + 0.5
    for k in range(scene.distractors.shape[1]):
        cx, cy, ha, hb, ang, kind = scene.distractors[:, k].unbind(dim=1)
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = sr * c / ha, sr * s / ha
        d, e = -sr * s / hb, sr * c / hb
        coef = torch.stack([a, b, centre - a * cx - b * cy, d, e, centre - d * cx - e * cy], 1)
        which = k * nshape + kind.long()
        lab = torch.maximum(lab, _warp(templates.shapes, which, coef, xs))
    bird = _warp(templates.birds, scene.shape, _bird_coefficients(scene, templates), xs)
    bbox = _bbox(bird > 0)
    lab = torch.maximum(lab, bird)
    del bird

    # Occluders: bands |n . (p - p0)| <= half width, on top of everything.
    for k in range(scene.occluders.shape[1]):
        px, py, ang, hw = scene.occluders[:, k].unbind(dim=1)
        nx, ny = -torch.sin(ang), torch.cos(ang)
        dist = _plane(xs, nx, ny, -(nx * px + ny * py))
        lab.masked_fill_(dist.abs_() <= _col(hw), LAYER[f"occluder{k}"])

    idx = lab.view(n, -1).long()
    part_mask = torch.gather(_layer_parts(scene.flip), 1, idx).view(n, size, size)
    object_mask = part_mask > 0

    # Colours: flat per layer; the background mixes in its second colour by the gratings.
    images = torch.gather(scene.colours.transpose(1, 2), 2, idx[:, None, :].expand(n, 3, -1))
    images = images.view(n, 3, size, size)
    g = scene.grating
    mix = _separable_sin(g[:, 0, 0], g[:, 0, 1], g[:, 0, 2], xs)
    mix += _separable_sin(g[:, 1, 0], g[:, 1, 1], g[:, 1, 2], xs)
    flat_bg = (g.abs().sum(dim=(1, 2)) == 0).to(mix.dtype)
    # (1 + (g1 + g2) / 2) / 2 in [0, 1], zero where the background is flat.
    mix = (mix * 0.25 + 0.5) * (1.0 - _col(flat_bg)) * (lab == 0)
    delta = scene.background - scene.colours[:, 0]
    images += mix[:, None] * delta[:, :, None, None]

    # Noise: a crop of the shared tile at a per-image offset (wrapping), all channels.
    t = noise_tile.shape[-1]
    ar = torch.arange(size, device=dev)
    rows = (scene.noise_offset[:, 1, None] + ar[None, :]) % t
    cols = (scene.noise_offset[:, 0, None] + ar[None, :]) % t
    noise = torch.take(noise_tile, rows[:, :, None] * t + cols[:, None, :])
    images += (noise * _col(scene.noise_amplitude))[:, None]
    images = images.clamp_(0.0, 1.0)

    # Keypoints, and their visibility read from the part mask.
    kp_uv = _mirror_sides(templates.keypoints[scene.shape], scene.flip)
    kp = _to_pixels(scene, kp_uv)
    xi, yi = kp[..., 0].round().long(), kp[..., 1].round().long()
    inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
    lin = yi.clamp(0, size - 1) * size + xi.clamp(0, size - 1)
    shown = torch.gather(part_mask.view(n, -1), 1, lin)
    visible = inside & (shown == torch.arange(1, len(PART_NAMES) + 1, device=dev)[None, :])
    return Drawn(images, part_mask, object_mask, kp.float(), visible, bbox)
