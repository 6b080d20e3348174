"""The species catalogue of the synthetic birds: parts, attributes and classes.

A species is a set of *attributes* of named parts: the colour of each plumage region, the
shape of the beak and of the tail, the colour and pattern of the wings. Two species that
share every attribute but those of one part differ *only* in that part, so the part that
tells them apart is known by construction (DESIGN.md, "Embedded default").

Part names and their order are those of CUB-200-2011's ``parts/parts.txt`` (part ``p``
here is CUB part id ``p + 1``), so annotations can be written in the CUB layout unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

PART_NAMES: tuple[str, ...] = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)
_P = {name: p for p, name in enumerate(PART_NAMES)}

# Parts that come in pairs share their attributes; a class pair that differs in "wings"
# differs in both the left and the right wing.
PART_GROUPS: dict[str, tuple[int, ...]] = {
    "back": (_P["back"],),
    "beak": (_P["beak"],),
    "belly": (_P["belly"],),
    "breast": (_P["breast"],),
    "crown": (_P["crown"],),
    "forehead": (_P["forehead"],),
    "eyes": (_P["left eye"], _P["right eye"]),
    "legs": (_P["left leg"], _P["right leg"]),
    "wings": (_P["left wing"], _P["right wing"]),
    "nape": (_P["nape"],),
    "tail": (_P["tail"],),
    "throat": (_P["throat"],),
}

# sRGB in [0, 1].
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "blue": (0.15, 0.35, 0.90),
    "yellow": (0.98, 0.86, 0.10),
    "orange": (0.98, 0.52, 0.06),
    "white": (0.96, 0.96, 0.94),
    "black": (0.07, 0.07, 0.08),
    "brown": (0.52, 0.32, 0.16),
    "tan": (0.82, 0.67, 0.45),
    "cream": (0.93, 0.88, 0.70),
    "grey": (0.60, 0.62, 0.66),
    "dark grey": (0.28, 0.29, 0.32),
    "olive": (0.46, 0.52, 0.16),
    "pink": (0.93, 0.58, 0.62),
}

# Beak in head-relative units: length L, half-width w at the base, downward hook h (the
# centre line drops by h * L * (t / L)^2 at distance t from the base).
BEAK_SHAPES: dict[str, tuple[float, float, float]] = {
    "short": (0.17, 0.075, 0.0),
    "long": (0.38, 0.060, 0.0),
    "hooked": (0.24, 0.080, 0.55),
    "conical": (0.20, 0.115, 0.0),
}

# Tail: length L, half-width w0 at the base and w1 at the end, depth of the fork notch
# and depth of the pointed end (both along the tail axis).
TAIL_SHAPES: dict[str, tuple[float, float, float, float, float]] = {
    "square": (0.30, 0.075, 0.095, 0.0, 0.0),
    "forked": (0.54, 0.065, 0.21, 0.30, 0.0),
    "pointed": (0.42, 0.085, 0.07, 0.0, 0.20),
    "fan": (0.32, 0.060, 0.20, 0.0, 0.0),
}

WING_PATTERNS: tuple[str, ...] = ("plain", "bars", "spots")


@dataclass(frozen=True)
class Species:
    """One class of synthetic bird: its name and the attributes of every part.

    Colours are names in :data:`PALETTE`; ``beak`` a key of :data:`BEAK_SHAPES`, ``tail``
    a key of :data:`TAIL_SHAPES`, ``wing_pattern`` one of :data:`WING_PATTERNS` (drawn in
    ``wing_mark`` colour on ``wing`` colour).
    """

    name: str
    back: str
    nape: str
    crown: str
    forehead: str
    throat: str
    breast: str
    belly: str
    wing: str
    wing_mark: str
    wing_pattern: str
    tail: str
    tail_shape: str
    beak: str
    beak_shape: str
    leg: str
    eye: str = "black"

    def with_(self, name: str, **changes: str) -> Species:
        """A copy named ``name`` with some attributes changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes, name=name)
        return Species(**values)


# Which attributes each part group shows: two species differ in a part group exactly when
# one of these attributes differs.
GROUP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "back": ("back",),
    "beak": ("beak", "beak_shape"),
    "belly": ("belly",),
    "breast": ("breast",),
    "crown": ("crown",),
    "forehead": ("forehead",),
    "eyes": ("eye",),
    "legs": ("leg",),
    "wings": ("wing", "wing_mark", "wing_pattern"),
    "nape": ("nape",),
    "tail": ("tail", "tail_shape"),
    "throat": ("throat",),
}

COLOUR_SLOTS: tuple[str, ...] = (
    "back",
    "nape",
    "crown",
    "forehead",
    "throat",
    "breast",
    "belly",
    "wing",
    "wing_mark",
    "tail",
    "beak",
    "leg",
    "eye",
)

_WARBLER = Species(
    name="Red_crowned_Warbler",
    back="brown",
    nape="brown",
    crown="red",
    forehead="tan",
    throat="cream",
    breast="cream",
    belly="cream",
    wing="brown",
    wing_mark="tan",
    wing_pattern="plain",
    tail="brown",
    tail_shape="square",
    beak="black",
    beak_shape="short",
    leg="pink",
)
_GULL = Species(
    name="Barred_Gull",
    back="grey",
    nape="white",
    crown="white",
    forehead="white",
    throat="white",
    breast="white",
    belly="white",
    wing="grey",
    wing_mark="black",
    wing_pattern="bars",
    tail="black",
    tail_shape="square",
    beak="yellow",
    beak_shape="hooked",
    leg="yellow",
)
_FINCH = Species(
    name="Yellow_breasted_Finch",
    back="olive",
    nape="olive",
    crown="black",
    forehead="black",
    throat="olive",
    breast="yellow",
    belly="cream",
    wing="black",
    wing_mark="white",
    wing_pattern="bars",
    tail="black",
    tail_shape="fan",
    beak="orange",
    beak_shape="conical",
    leg="pink",
)
_SPARROW = Species(
    name="White_throated_Sparrow",
    back="dark grey",
    nape="dark grey",
    crown="dark grey",
    forehead="dark grey",
    throat="white",
    breast="grey",
    belly="white",
    wing="brown",
    wing_mark="black",
    wing_pattern="spots",
    tail="dark grey",
    tail_shape="pointed",
    beak="black",
    beak_shape="short",
    leg="pink",
)

# Four families of three or two species; inside a family, pairs differ in one part group.
# The first ten are the default classes.
SPECIES: tuple[Species, ...] = (
    _WARBLER,
    _WARBLER.with_("Blue_crowned_Warbler", crown="blue"),
    _WARBLER.with_("Long_billed_Warbler", beak_shape="long"),
    _GULL,
    _GULL.with_("Spotted_Gull", wing_pattern="spots"),
    _GULL.with_("Fork_tailed_Gull", tail_shape="forked"),
    _FINCH,
    _FINCH.with_("Red_breasted_Finch", breast="red"),
    _SPARROW,
    _SPARROW.with_("Black_throated_Sparrow", throat="black"),
    _SPARROW.with_("Black_naped_Sparrow", nape="black"),
    _FINCH.with_("Orange_bellied_Finch", belly="orange"),
)


def differing_groups(a: Species, b: Species) -> tuple[str, ...]:
    """Part groups (keys of :data:`PART_GROUPS`) whose attributes differ between two species."""
    return tuple(
        g
        for g, attrs in GROUP_ATTRIBUTES.items()
        if any(getattr(a, k) != getattr(b, k) for k in attrs)
    )


def class_parts(species: tuple[Species, ...]) -> dict[int, tuple[int, ...]]:
    """Parts that distinguish each class from its nearest neighbour classes.

    The distance between two classes is the number of part groups whose attributes differ;
    the nearest neighbours of class ``c`` are the other classes at the smallest distance,
    and its class parts are every part of every group that differs from one of them.

    Returns
    -------
    dict of int to tuple of int
        Sorted part indices (into :data:`PART_NAMES`) for each class index.
    """
    out: dict[int, tuple[int, ...]] = {}
    for c, sc in enumerate(species):
        diffs = [differing_groups(sc, so) for o, so in enumerate(species) if o != c]
        if not diffs:
            out[c] = ()
            continue
        nearest = min(len(d) for d in diffs)
        parts = {p for d in diffs if len(d) == nearest for g in d for p in PART_GROUPS[g]}
        out[c] = tuple(sorted(parts))
    return out


def one_part_pairs(species: tuple[Species, ...]) -> list[tuple[int, int, str]]:
    """Class pairs ``(a, b, group)``, ``a < b``, that differ in exactly one part group."""
    pairs = []
    for a in range(len(species)):
        for b in range(a + 1, len(species)):
            d = differing_groups(species[a], species[b])
            if len(d) == 1:
                pairs.append((a, b, d[0]))
    return pairs
