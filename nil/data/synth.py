"""Synthetic histology-like patches: nil's built-in data set, with look-alike class pairs.

Each patch is rendered in optical density, as stained tissue absorbs light (Beer-Lambert):
an eosin background (pink) with low-frequency texture, plus hematoxylin "nuclei" (purple),
each an axis-aligned Gaussian ellipse. A class fixes the mean of eight parameters (nucleus
coverage, size, elongation, hematoxylin strength and hue, eosin strength, texture amplitude and
coarseness); every patch jitters them, its nucleus positions, its stain vectors and its pixels,
so classes overlap.

Classes come in look-alike pairs (0, 1), (2, 3), ...: a pair shares a centre in parameter
space, spread far from the other pairs' centres (a Latin hypercube), and its two classes share
their stains and differ in nuclear morphology and texture coarseness only, by
``(1 - similarity) * PAIR_GAP`` of each range. similarity 1 makes a pair inseparable; the
default 0.8 is hard but learnable (a small CNN is well above chance, its errors almost all
inside pairs). Up to about 10 classes the pairs stay closer than any two other classes in
simple colour and nucleus statistics; beyond that the pair centres crowd. The class design
does not depend on ``seed``: stores written with different seeds are independent samples of
the same task.

Rendering is vectorised over a whole chunk (the Gaussians are separable, so nuclei are drawn
by one batched matrix product) and the store is written to a temporary folder renamed at the
end, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from nil.errors import NilError

LOG = logging.getLogger(__name__)

# name: (low, high) of each class parameter, for 32x32 patches (sizes and counts scale with size)
PARAMS = {
    "coverage": (0.04, 0.30),  # mean fraction of the patch covered by nuclei
    "radius": (1.1, 2.4),  # nucleus standard deviation along its short axis, px
    "elongation": (1.0, 2.2),  # long axis / short axis
    "hema": (0.5, 1.3),  # hematoxylin optical density at a nucleus centre
    "hue": (0.0, 1.0),  # 0: purple hematoxylin, 1: bluer
    "eosin": (0.12, 0.45),  # eosin optical density of the background
    "texture": (0.05, 0.45),  # relative amplitude of the background texture
    "coarse": (0.0, 1.0),  # 0: fine texture, 1: coarse texture
}
NUCLEUS_AREA = math.pi * 1.8**2  # area of a drawn nucleus / (radius^2 * elongation), see render
PAIR_PARAMS = ("coverage", "radius", "elongation", "coarse")  # what tells a look-alike pair apart
PAIR_GAP = 0.5  # distance in each PAIR_PARAMS, as a fraction of its range, at similarity 0
SPAN = 0.8  # pair centres fill the middle SPAN of each parameter's range
JITTER = 0.08  # per-patch standard deviation of each parameter, as a fraction of its range
PIXEL_NOISE = 3.0  # standard deviation of the per-pixel noise, in 0..255 levels
DESIGN_SEED = 20240531  # fixes the class design, independently of the sample seed
DESIGN_TRIES = 256  # Latin hypercubes tried for the pair centres
SYNTH_VERSION = 1  # bump when a change alters the bytes written for the same arguments
PAIR_NAMES = ("tumour", "stroma", "mucosa", "lympho", "debris", "muscle", "adipose", "necrosis")

# Stain optical-density vectors (Ruifrok & Johnston): hematoxylin, a bluer variant, eosin.
HEMA = np.array([0.65, 0.70, 0.29], np.float32)
HEMA_BLUE = np.array([0.80, 0.55, 0.18], np.float32)
EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


@dataclass
class ClassDesign:
    """The class means: ``means`` float32 ``(classes, len(PARAMS))`` in units of PARAMS."""

    names: list[str]
    means: np.ndarray


def class_names(classes: int) -> list[str]:
    """``["tumour-a", "tumour-b", "stroma-a", ...]``; an odd last class has no pair."""
    names = []
    for k in range(classes):
        p = k // 2
        base = PAIR_NAMES[p] if p < len(PAIR_NAMES) else f"pair{p}"
        names.append(base if k == classes - 1 and classes % 2 else f"{base}-{'ab'[k % 2]}")
    return names


def design_classes(classes: int, similarity: float) -> ClassDesign:
    """The per-class parameter means, in the units of PARAMS.

    Pair centres fill a Latin hypercube (one stratum per pair in every parameter), so any two
    pairs differ by at least ``SPAN / pairs`` of the range in each parameter; of DESIGN_TRIES
    hypercubes the one whose closest two pairs are farthest apart is kept. The two classes of a
    pair differ by ``(1 - similarity) * PAIR_GAP`` of the range in each of PAIR_PARAMS.
    """
    rng = np.random.default_rng(DESIGN_SEED)
    pairs, d = (classes + 1) // 2, len(PARAMS)
    lo, hi = (np.array(v, np.float32) for v in zip(*PARAMS.values()))
    strata = rng.permuted(np.tile(np.arange(pairs), (DESIGN_TRIES, d, 1)), axis=2)  # (T, d, P)
    gaps = np.linalg.norm(strata[:, :, :, None] - strata[:, :, None, :], axis=1)  # (T, P, P)
    gaps[:, np.arange(pairs), np.arange(pairs)] = np.inf
    best = strata[int(np.argmax(gaps.min(axis=(1, 2))))].T  # (P, d)
    centre = (1 - SPAN) / 2 + SPAN * (best + 0.5) / pairs
    # A pair differs in the morphology parameters only; its stain colours are shared.
    sign = rng.choice([-1.0, 1.0], size=(pairs, d)) * np.isin(list(PARAMS), PAIR_PARAMS)
    half = (1.0 - similarity) * PAIR_GAP / 2 * sign
    unit = np.empty((classes, d), np.float32)
    for k in range(classes):
        p = k // 2
        unit[k] = centre[p] + (half[p] if k % 2 else -half[p])
    if classes % 2:
        unit[-1] = centre[-1]
    unit = np.clip(unit, 0.0, 1.0)  # only reached at low similarity
    return ClassDesign(class_names(classes), (lo + unit * (hi - lo)).astype(np.float32))


def _upsample(size: int, grid: int) -> np.ndarray:
    """Bilinear interpolation matrix float32 ``(size, grid)``: a ``grid`` lattice to ``size`` px."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / size * (grid - 1)
    j = np.clip(np.floor(x).astype(int), 0, grid - 2)
    t = x - j
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), j] = 1 - t
    m[np.arange(size), j + 1] = t
    return m


def _texture(rng: np.random.Generator, b: int, size: int, grid: int) -> np.ndarray:
    """Smooth noise float32 ``(b, size, size)`` with unit variance at the lattice points."""
    m = _upsample(size, grid)
    g = rng.standard_normal((b, grid, grid), dtype=np.float32)
    return m @ g @ m.T


def render(labels: np.ndarray, design: ClassDesign, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Patches of the given classes: labels int ``(B,)`` -> uint8 ``(B, size, size, 3)``."""
    b = len(labels)
    scale = size / 32.0
    lo, hi = (np.array(v, np.float32) for v in zip(*PARAMS.values()))
    theta = design.means[labels] + JITTER * (hi - lo) * rng.standard_normal(
        (b, len(PARAMS)), dtype=np.float32)
    theta = np.clip(theta, lo, hi)
    coverage, radius, elong, hema, hue, eosin, tex_amp, coarse = theta.T

    # Nuclei: a fixed maximum per patch, the ones beyond each patch's count get zero weight.
    # The count follows from the coverage and the nucleus area, so that size and coverage are
    # separate visible traits instead of compensating each other.
    density = coverage * size * size / (NUCLEUS_AREA * (radius * scale) ** 2 * elong)
    most = PARAMS["coverage"][1] * 1024 / (NUCLEUS_AREA * PARAMS["radius"][0] ** 2)
    k_max = int(math.ceil((1.4 * most + 6) * scale * scale))
    count = np.minimum(rng.poisson(density), k_max)
    on = np.arange(k_max)[None, :] < count[:, None]  # (B, K)
    cy = rng.uniform(-2, size + 2, (b, k_max)).astype(np.float32)
    cx = rng.uniform(-2, size + 2, (b, k_max)).astype(np.float32)
    r = radius[:, None] * scale * np.exp(0.15 * rng.standard_normal((b, k_max), dtype=np.float32))
    long_axis = r * elong[:, None]
    vertical = rng.random((b, k_max)) < 0.5  # long axis along y or along x
    sy, sx = np.where(vertical, long_axis, r), np.where(vertical, r, long_axis)
    strength = np.where(on, hema[:, None] * (0.8 + 0.4 * rng.random((b, k_max), np.float32)), 0)
    strength = strength.astype(np.float32)
    grid = np.arange(size, dtype=np.float32) + 0.5
    # exp(-dy^2/2sy^2 - dx^2/2sx^2) = gy * gx: the sum over nuclei is one batched matmul.
    gy = np.exp(-0.5 * ((grid[None, :, None] - cy[:, None, :]) / sy[:, None, :]) ** 2)  # (B,S,K)
    gx = np.exp(-0.5 * ((grid[None, None, :] - cx[:, :, None]) / sx[:, :, None]) ** 2)  # (B,K,S)
    nuclei = (gy * strength[:, None, :]) @ gx  # (B, S, S)
    # Steepen the Gaussian flanks into a nucleus edge; overlapping nuclei saturate.
    h = hema[:, None, None]
    nuclei = np.clip(1.8 * nuclei - 0.35 * h, 0, 1.4 * h)

    # Background: eosin modulated by a mix of coarse and fine smooth noise.
    fine, rough = _texture(rng, b, size, max(3, round(8 * scale))), _texture(rng, b, size, 3)
    c = coarse[:, None, None]
    tex = c * rough + (1 - c) * fine
    eos = eosin[:, None, None] * np.clip(1 + tex_amp[:, None, None] * tex, 0.2, None)

    # Per-patch stain matrix (hematoxylin row with its hue mix, eosin row), jittered a little.
    stains = np.empty((b, 2, 3), np.float32)
    stains[:, 0] = (1 - hue[:, None]) * HEMA + hue[:, None] * HEMA_BLUE
    stains[:, 1] = EOSIN
    stains *= 1 + 0.05 * rng.standard_normal((b, 2, 3), dtype=np.float32)
    od = np.stack([nuclei, eos], axis=-1).reshape(b, size * size, 2) @ stains  # (B, S*S, 3)
    img = np.exp(np.negative(od, out=od), out=od)
    img *= 255.0
    # Uniform noise of the same standard deviation: a third of the cost of Gaussian noise.
    noise = rng.random(img.shape, dtype=np.float32)
    noise -= 0.5
    noise *= PIXEL_NOISE * math.sqrt(12)
    img += noise
    img += 0.5  # round, not truncate, in the cast below
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8).reshape(b, size, size, 3)


def balanced_labels(n: int, classes: int, seed: int) -> np.ndarray:
    """int64 ``(n,)``: each class ``n // classes`` or one more times, in a seeded order."""
    return np.random.default_rng([seed, 1]).permutation(np.arange(n, dtype=np.int64) % classes)


def _create(group, name: str, **kw):
    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3 or 2
    return create(name, **kw)


def _render_chunk(c: int, labels: np.ndarray, design: ClassDesign, size: int, seed: int,
                  block: int) -> np.ndarray:
    """Chunk ``c`` of the store: uint8 ``(len(labels), size, size, 3)``, from its own stream."""
    rng = np.random.default_rng([seed, 2, c])  # one stream per chunk: same bytes, any threads
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for a in range(0, len(labels), block):
        out[a:a + block] = render(labels[a:a + block], design, size, rng)
    return out


def _write(tmp: Path, n: int, size: int, design: ClassDesign, seed: int, chunk: int,
           attrs: dict, progress: bool, workers: int) -> None:
    group = zarr.open_group(str(tmp), mode="w")
    labels = balanced_labels(n, len(design.names), seed)
    _create(group, "labels", shape=(n,), chunks=(min(n, 1 << 20),), dtype="int64")[:] = labels
    images = _create(group, "images", shape=(n, size, size, 3), chunks=(chunk, size, size, 3),
                     dtype="uint8")
    # Render in blocks of about 4M pixels to bound the float32 temporaries.
    block = max(1, min(chunk, (1 << 22) // (size * size)))
    n_chunks = math.ceil(n / chunk)
    # numpy releases the GIL in its array loops, so threads render chunks in parallel while
    # this thread compresses and writes them in order; at most 2 * workers chunks in memory.
    pending: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(workers) as pool, tqdm(
        total=n, desc="synthetic patches", unit="patch", disable=not progress
    ) as bar:

        def write_oldest() -> None:
            c, future = pending.popleft()
            data = future.result()
            images[c * chunk:c * chunk + len(data)] = data
            bar.update(len(data))

        for c in range(n_chunks):
            part = labels[c * chunk:(c + 1) * chunk]
            pending.append((c, pool.submit(_render_chunk, c, part, design, size, seed, block)))
            if len(pending) > workers:
                write_oldest()
        while pending:
            write_oldest()
    group.attrs.update(attrs)


def write_synthetic(
    out: str | Path,
    n: int,
    size: int = 32,
    classes: int = 4,
    seed: int = 0,
    similarity: float = 0.8,
    chunk: int = 4096,
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` synthetic histology-like patches as a zarr store at ``out``; return ``out``.

    Store: ``images`` uint8 ``(n, size, size, 3)`` chunked by ``chunk`` along n, ``labels`` int64
    ``(n,)`` (balanced), attributes ``classes`` (names) and ``generator`` (all parameters).
    The same arguments give the same bytes. ``out`` must not exist unless ``overwrite``.
    """
    out = Path(out)
    if n < 1 or size < 8 or classes < 2 or chunk < 1:
        raise NilError(f"need n >= 1, size >= 8, classes >= 2, chunk >= 1; got n={n}, "
                       f"size={size}, classes={classes}, chunk={chunk}")
    if not 0.0 <= similarity <= 1.0:
        raise NilError(f"similarity must be in [0, 1], got {similarity}")
    if out.exists() and not overwrite:
        raise NilError(f"{out} already exists (pass overwrite=True to replace it)")
    design = design_classes(classes, similarity)
    attrs = {
        "classes": design.names,
        "generator": {"name": "nil.data.synth", "n": n, "size": size, "classes": classes,
                      "seed": seed, "similarity": similarity, "chunk": chunk,
                      "design_seed": DESIGN_SEED, "version": SYNTH_VERSION},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    LOG.info("writing %d synthetic %dx%d patches of %d classes to %s", n, size, size, classes, out)
    started = time.perf_counter()
    try:
        _write(tmp, n, size, design, seed, chunk, attrs, progress,
               workers=min(4, os.cpu_count() or 1))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:  # interrupted too: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return out
