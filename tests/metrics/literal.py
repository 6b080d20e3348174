"""Literal, slow reference implementations of the metric formulas (docs/methods/metrics.rst, §8).

Written straight from the papers with Python loops over pixels, images, classes and filters,
independently of the vectorised code in ``xnn_toolkit.metrics`` (no shared helpers). Used by
the tests and by ``bench/metrics.py``.
"""

from __future__ import annotations

import math

import numpy as np


def normalise_literal(heatmap):
    """``S_ij = C_ij / Σ C`` with the map clamped at 0 (all zero when there is no mass)."""
    h, w = len(heatmap), len(heatmap[0])
    total = 0.0
    for i in range(h):
        for j in range(w):
            total += max(float(heatmap[i][j]), 0.0)
    out = [[0.0] * w for _ in range(h)]
    if total > 0:
        for i in range(h):
            for j in range(w):
                out[i][j] = max(float(heatmap[i][j]), 0.0) / total
    return out


def voronoi_literal(heatmaps, keypoints, visible, bbox):
    """Thesis Algorithm 3 (Khorram 2020, App. A) for one image, every neuron, with per-pixel loops.

    Parameters: ``heatmaps`` n x H x W nested lists / arrays (one per neuron), ``keypoints``
    P x 2 (x, y), ``visible`` P, ``bbox`` (x0, y0, x1, y1) inclusive. Returns n x (P + 1):
    the P Voronoi part probabilities and the context part (mass outside the box).
    """
    n_neurons = len(heatmaps)
    h, w = len(heatmaps[0]), len(heatmaps[0][0])
    p_count = len(keypoints)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    vis = [
        p
        for p in range(p_count)
        if bool(visible[p])
        and math.isfinite(float(keypoints[p][0]))
        and math.isfinite(float(keypoints[p][1]))
    ]

    def in_box(i, j):
        return y0 <= i <= y1 and x0 <= j <= x1

    # Voronoi graph of the box: nearest visible part label (first one on ties)
    owner = {}
    for i in range(h):
        for j in range(w):
            if not in_box(i, j) or not vis:
                continue
            best, best_d2 = None, None
            for p in vis:
                dy = i - float(keypoints[p][1])
                dx = j - float(keypoints[p][0])
                d2 = dy * dy + dx * dx
                if best_d2 is None or d2 < best_d2:
                    best, best_d2 = p, d2
            owner[(i, j)] = best

    result = []
    for n in range(n_neurons):  # for each neuron n of the x-layer in image I_m
        s = normalise_literal(heatmaps[n])
        row = []
        for p in range(p_count):  # for each part p with its Voronoi graph G_p
            g_p = [pix for pix, q in owner.items() if q == p]
            d = {}
            for i, j in g_p:  # for each pixel (i, j) in G_p: distance to the part label
                dy = i - float(keypoints[p][1])
                dx = j - float(keypoints[p][0])
                d[(i, j)] = math.sqrt(dy * dy + dx * dx)
            d_max = max(d.values()) if d else 0.0
            d_bar = {}
            for pix in g_p:  # normalise the distance into [0, 1]
                d_bar[pix] = d[pix] / d_max if d_max > 0 else 0.0
            s_p = 0.0
            for i in range(h):
                for j in range(w):
                    dbar_ijp = d_bar[(i, j)] if (i, j) in d_bar else 1.0  # pixel not in G_p
                    s_p += (1.0 - dbar_ijp) * s[i][j]  # P(part | pixel) P(pixel | neuron)
            row.append(s_p)
        context = 0.0
        for i in range(h):
            for j in range(w):
                if not in_box(i, j):
                    context += s[i][j]
        row.append(context)
        result.append(row)
    return result


def keypoint_literal(heatmap, keypoints, visible):
    """Pixel-level probability at each keypoint (round half up); 0 if invisible / outside."""
    s = normalise_literal(heatmap)
    h, w = len(s), len(s[0])
    out = []
    for p in range(len(keypoints)):
        x, y = float(keypoints[p][0]), float(keypoints[p][1])
        if not bool(visible[p]) or not (math.isfinite(x) and math.isfinite(y)):
            out.append(0.0)
            continue
        j, i = math.floor(x + 0.5), math.floor(y + 0.5)
        out.append(s[i][j] if 0 <= i < h and 0 <= j < w else 0.0)
    return out


def mask_parts_literal(heatmap, part_mask, num_parts):
    """``S_p = Σ_{(i,j) in part p} S_ij`` for p = 0..P-1, then the mass on label 0."""
    s = normalise_literal(heatmap)
    out = [0.0] * (num_parts + 1)
    for i in range(len(s)):
        for j in range(len(s[0])):
            lab = int(part_mask[i][j])
            if lab == 0:
                out[num_parts] += s[i][j]
            else:
                out[lab - 1] += s[i][j]
    return out


def locality_literal(part_probs):
    """``part_probs[m][n][p]`` -> entropy per x-feature n of the normalised mean histogram."""
    m_count, n_count, b = len(part_probs), len(part_probs[0]), len(part_probs[0][0])
    ent = []
    for n in range(n_count):
        mean = [sum(part_probs[m][n][p] for m in range(m_count)) / m_count for p in range(b)]
        total = sum(mean)
        s = [v / total for v in mean] if total > 0 else [1.0 / b] * b
        ent.append(-sum(v * math.log(v) for v in s if v > 0))
    return ent


def orthogonality_literal(maps):
    """``maps``: N x n x H x W array. Returns (O1, O2) from numpy's covariance."""
    maps = np.asarray(maps, dtype=np.float64)
    n = maps.shape[1]
    vectors = [np.concatenate([maps[m, l].ravel() for m in range(maps.shape[0])]) for l in range(n)]
    c = np.cov(np.stack(vectors))
    d = np.diag(1.0 / np.sqrt(np.diag(c)))
    p = d @ c @ d
    o1 = np.linalg.norm(p, "fro") - math.sqrt(n)
    o2 = -math.log(np.linalg.det(p))
    return o1, o2


def f_reg_literal(y_bar, y_hat):
    return sum(abs(float(a) - float(b)) for a, b in zip(y_bar, y_hat)) / len(y_bar)


def _argmax(row):
    best = 0
    for k in range(1, len(row)):
        if row[k] > row[best]:
            best = k
    return best


def f_cls_literal(y_bar, logits, c):
    """Share of examples whose argmax is unchanged when logit c is replaced by y_bar."""
    kept = 0
    for i in range(len(logits)):
        row = [float(v) for v in logits[i]]
        before = _argmax(row)
        row[c] = float(y_bar[i])
        kept += _argmax(row) == before
    return kept / len(logits)


def iou_literal(pred, gt):
    inter = union = 0
    for i in range(len(gt)):
        for j in range(len(gt[0])):
            a, b = bool(pred[i][j]), bool(gt[i][j])
            inter += a and b
            union += a or b
    return inter / union if union else 0.0


def filter_localization_literal(ious, labels, num_classes, n_frac):
    """Seed 001 App. H.1 with loops. ``ious[x][k]``. Returns dict of per-filter / overall."""
    k_count = len(ious[0])
    per_filter_iou, per_filter_ap, best_cls = [], [], []
    iou_ck = [[math.nan] * num_classes for _ in range(k_count)]
    ap_ck = [[math.nan] * num_classes for _ in range(k_count)]
    for k in range(k_count):
        for c in range(num_classes):
            members = [x for x in range(len(labels)) if labels[x] == c]
            if members:
                iou_ck[k][c] = sum(ious[x][k] for x in members) / len(members)
                ap_ck[k][c] = sum(1.0 for x in members if ious[x][k] >= n_frac) / len(members)
        best = None
        for c in range(num_classes):
            if math.isnan(ap_ck[k][c]):
                continue
            if best is None or ap_ck[k][c] > ap_ck[k][best]:
                best = c
            elif ap_ck[k][c] == ap_ck[k][best] and iou_ck[k][c] > iou_ck[k][best]:
                best = c  # ties of APn go to the higher IoU
        best_cls.append(best)
        per_filter_iou.append(iou_ck[k][best])
        per_filter_ap.append(ap_ck[k][best])
    by_class_iou, by_class_ap = [], []
    for c in range(num_classes):
        f_c = [k for k in range(k_count) if best_cls[k] == c]
        by_class_iou.append(sum(per_filter_iou[k] for k in f_c) / len(f_c) if f_c else math.nan)
        by_class_ap.append(sum(per_filter_ap[k] for k in f_c) / len(f_c) if f_c else math.nan)
    return {
        "iou_per_class": iou_ck,
        "ap_per_class": ap_ck,
        "best_class": best_cls,
        "iou_per_filter": per_filter_iou,
        "ap_per_filter": per_filter_ap,
        "iou_by_class": by_class_iou,
        "ap_by_class": by_class_ap,
        "iou": sum(per_filter_iou) / k_count,
        "ap": sum(per_filter_ap) / k_count,
    }


def energy_literal(heatmap, mask):
    inside = total = 0.0
    for i in range(len(mask)):
        for j in range(len(mask[0])):
            v = max(float(heatmap[i][j]), 0.0)
            total += v
            if mask[i][j]:
                inside += v
    return inside / total if total > 0 else 0.0


def first_max_literal(heatmap):
    """(row, col) of the first maximum in row-major order."""
    best = (0, 0)
    for i in range(len(heatmap)):
        for j in range(len(heatmap[0])):
            if heatmap[i][j] > heatmap[best[0]][best[1]]:
                best = (i, j)
    return best


def pointing_literal(heatmap, mask, tolerance):
    """Hit if some mask pixel is closer than ``tolerance`` to the first maximum, or under it."""
    flat = [float(v) for r in heatmap for v in r]
    if max(flat) == min(flat):
        return False
    pi, pj = first_max_literal(heatmap)
    for i in range(len(mask)):
        for j in range(len(mask[0])):
            if mask[i][j]:
                d2 = (i - pi) ** 2 + (j - pj) ** 2
                if d2 == 0 or d2 < tolerance**2:
                    return True
    return False


def order_literal(heatmap):
    """Pixels (i, j) by decreasing value, ties in row-major order."""
    w = len(heatmap[0])
    pix = [(i, j) for i in range(len(heatmap)) for j in range(w)]
    return sorted(pix, key=lambda ij: (-float(heatmap[ij[0]][ij[1]]), ij[0] * w + ij[1]))


def deletion_literal(model_fn, image, heatmap, target, baseline, steps, insertion):
    """Scores of one image at each of ``steps + 1`` steps; ``model_fn(image) -> probs``."""
    c, h, w = image.shape
    order = order_literal(heatmap)
    scores = []
    for k in range(steps + 1):
        count = (k * h * w) // steps
        if insertion:
            img = baseline.copy()
            for i, j in order[:count]:
                for ch in range(c):
                    img[ch, i, j] = image[ch, i, j]
        else:
            img = image.copy()
            for i, j in order[:count]:
                for ch in range(c):
                    img[ch, i, j] = baseline[ch, i, j]
        scores.append(float(model_fn(img)[target]))
    area = 0.0
    for k in range(steps):
        area += (scores[k] + scores[k + 1]) / 2 / steps
    return scores, area


def conditional_entropy_literal(h, y, eps=1e-12):
    """SHADE Gaussian bound per unit with loops: Σ_y p(y) ½ log(2πe Var(H|Y=y))."""
    h = np.asarray(h, dtype=np.float64)
    n, d = h.shape
    classes = sorted(set(int(v) for v in y))
    out, ratio = [], []
    for i in range(d):
        total = 0.0
        within = 0.0
        for c in classes:
            vals = [h[k, i] for k in range(n) if int(y[k]) == c]
            mu = sum(vals) / len(vals)
            var = sum((v - mu) ** 2 for v in vals) / len(vals)
            p = len(vals) / n
            total += p * 0.5 * math.log(2 * math.pi * math.e * max(var, eps))
            within += p * var
        out.append(total)
        all_mu = sum(h[:, i]) / n
        all_var = sum((v - all_mu) ** 2 for v in h[:, i]) / n
        ratio.append(within / all_var if all_var > 0 else 1.0)
    return out, ratio


def shade_literal(h):
    """Eq. 2.20 / A.10 over the whole data, divided by K: Σ_z p(z) Var(H | Z = z)."""
    h = np.asarray(h, dtype=np.float64)
    k_count, d = h.shape
    out = []
    for i in range(d):
        total = 0.0
        for z in (0, 1):
            w = [1 / (1 + math.exp(-v)) if z == 1 else 1 - 1 / (1 + math.exp(-v)) for v in h[:, i]]
            mu = sum(wk * v for wk, v in zip(w, h[:, i])) / sum(w)
            total += sum(wk * (v - mu) ** 2 for wk, v in zip(w, h[:, i]))
        out.append(total / k_count)
    return out


def binned_split_literal(values, y, bins):
    """H(B), I(B;Y), H(B|Y) of one unit with numpy's histogram edges and plug-in counts."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.histogram_bin_edges(values, bins=bins)
    b = np.clip(np.digitize(values, edges[1:-1], right=False), 0, bins - 1)
    n = len(values)
    pb, py, pby = {}, {}, {}
    for bi, yi in zip(b.tolist(), [int(v) for v in y]):
        pb[bi] = pb.get(bi, 0) + 1 / n
        py[yi] = py.get(yi, 0) + 1 / n
        pby[(bi, yi)] = pby.get((bi, yi), 0) + 1 / n
    h = -sum(p * math.log(p) for p in pb.values())
    hy = -sum(p * math.log(p) for p in py.values())
    hby = -sum(p * math.log(p) for p in pby.values())
    mi = sum(p * math.log(p / (pb[bi] * py[yi])) for (bi, yi), p in pby.items())
    return h, mi, hby - hy
