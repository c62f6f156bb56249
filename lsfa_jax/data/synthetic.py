"""A small MVTec-3D-format dataset with exact defect masks, for tests and the demo.

Scene: an object (a height field, one shape per class) rests on a slightly tilted support plane
about 0.65 m in front of a pinhole camera looking along +z; xyz are metres in the camera frame.
Each pixel's ray is intersected with the surface z = plane(x, y) - h(x, y) by fixed-point
iteration (the slopes are small, so it contracts). Samples vary in pose, size, colour, texture
and plane tilt; xyz get ray-depth noise and randomly missing points (0, 0, 0).

Defect types (test split), each with an exact mask:
  geometric (gt code 255): a dent or bump on the object; changes xyz only,
  colour    (gt code 254): a stain or scratch painted on the object; changes rgb only,
  both      (gt code 253): both at the same place; the mask is their union.
Shading uses the defect-free geometry, so a geometric defect leaves rgb untouched.

Every random quantity of a sample comes from its own seed (run seed, class, split, defect type,
index), drawn in a fixed order whether or not the defect is rendered, so samples can be made in
any order or in parallel, and `render_sample(..., with_defect=False)` gives the same sample
without its defect.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from lsfa_jax import console
from lsfa_jax.atomic_io import file_mode, make_temp_dir

SHAPES = ("sphere_cap", "box", "torus")
DEFECT_TYPES = ("geometric", "colour", "both")
DEFECT_CODES = {"geometric": 255, "colour": 254, "both": 253}
MARKER = "SYNTHETIC.json"
GENERATOR_VERSION = 1
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_TYPE_CODES = {"good": 0, "geometric": 1, "colour": 2, "both": 3}
_CLASS_HUES = {"sphere_cap": 0.08, "box": 0.55, "torus": 0.3}
_FOCAL_PER_PIXEL = 3.0  # focal length in pixels per image pixel: about +-0.11 m seen at 0.65 m
_ITERATIONS = 24


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    classes: tuple[str, ...] = SHAPES
    image_size: int = 128
    num_train: int = 20
    num_validation: int = 4
    num_test_good: int = 6
    num_test_per_defect: int = 4
    seed: int = 0
    noise_std: float = 0.0002  # metres, along the ray
    missing_fraction: float = 0.02

    def __post_init__(self) -> None:
        unknown = sorted(set(self.classes) - set(SHAPES))
        if unknown or not self.classes:
            raise ValueError(f"synthetic classes must be a non-empty subset of {SHAPES}: {unknown}")
        if self.image_size < 16:
            raise ValueError(f"synthetic image_size must be >= 16, got {self.image_size}")
        if min(self.num_train, self.num_validation, self.num_test_good) < 1:
            raise ValueError("synthetic num_train, num_validation, num_test_good must be >= 1")
        if self.num_test_per_defect < 1:
            raise ValueError("synthetic num_test_per_defect must be >= 1")
        if not 0.0 <= self.missing_fraction < 1.0:
            raise ValueError(f"missing_fraction must be in [0, 1), got {self.missing_fraction}")

    @classmethod
    def from_mapping(cls, values: dict) -> SyntheticConfig:
        """From a dict or ConfigDict.to_dict(); `classes` may be a list or a tuple."""
        values = dict(values)
        if "classes" in values:
            values["classes"] = tuple(values["classes"])
        return cls(**values)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"classes": list(self.classes)}


def camera_matrix(image_size: int) -> tuple[float, float, float]:
    """(focal, cx, cy) in pixels of the pinhole camera."""
    centre = (image_size - 1) / 2.0
    return _FOCAL_PER_PIXEL * image_size, centre, centre


def _height(shape: str, x: np.ndarray, y: np.ndarray, pose: dict) -> np.ndarray:
    """Object height (metres, >= 0) above the support plane at camera-frame (x, y)."""
    dx, dy = x - pose["x0"], y - pose["y0"]
    cos, sin = np.cos(pose["theta"]), np.sin(pose["theta"])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    s = pose["scale"]
    if shape == "sphere_cap":
        radius, cap = 0.045 * s, 0.025 * s
        sphere = (radius**2 + cap**2) / (2 * cap)
        return np.maximum(np.sqrt(np.maximum(sphere**2 - u**2 - v**2, 0.0)) - (sphere - cap), 0.0)
    if shape == "box":
        edge = 0.006 * s

        def ramp(t: np.ndarray) -> np.ndarray:
            q = np.clip(t / edge, 0.0, 1.0)
            return q * q * (3 - 2 * q)

        return 0.018 * s * ramp(0.05 * s - np.abs(u)) * ramp(0.032 * s - np.abs(v))
    if shape == "torus":
        ring, tube = 0.045 * s, 0.016 * s
        q2 = ((np.hypot(u, v) - ring) / tube) ** 2
        return 0.014 * s * np.maximum(1.0 - q2, 0.0) ** 1.5
    raise ValueError(f"unknown synthetic shape {shape!r}")


def _cast_rays(size: int, height_fn, plane: np.ndarray) -> np.ndarray:
    """(size, size, 3) hit points of the pixel rays with z = plane(x, y) - height(x, y)."""
    focal, cx, cy = camera_matrix(size)
    rows, cols = np.mgrid[0:size, 0:size]
    dx, dy = (cols - cx) / focal, (rows - cy) / focal
    depth = np.full((size, size), plane[0])
    for _ in range(_ITERATIONS):
        x, y = depth * dx, depth * dy
        depth = plane[0] + plane[1] * x + plane[2] * y - height_fn(x, y)
    return np.stack([depth * dx, depth * dy, depth], axis=-1)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _sample_seed(cfg: SyntheticConfig, class_name: str, split: str, kind: str, index: int):
    return np.random.SeedSequence(
        [cfg.seed, SHAPES.index(class_name), _SPLIT_CODES[split], _TYPE_CODES[kind], index]
    )


def _draw(rng: np.random.Generator, size: int) -> dict:
    """All random quantities of one sample, in a fixed order."""
    return dict(
        pose=dict(
            x0=rng.uniform(-0.012, 0.012),
            y0=rng.uniform(-0.012, 0.012),
            theta=rng.uniform(0.0, np.pi),
            scale=rng.uniform(0.9, 1.1),
        ),
        plane=np.array([rng.uniform(0.64, 0.66), *rng.uniform(-0.08, 0.08, 2)]),
        hue=rng.uniform(-0.04, 0.04),
        value=rng.uniform(0.75, 0.95),
        plane_grey=rng.uniform(0.35, 0.5),
        texture=rng.uniform(size=(2, 3, 4)),  # object / plane: 3 waves of (kx, ky, phase, amp)
        depth_noise=rng.standard_normal((size, size)),
        colour_noise=rng.standard_normal((size, size, 3)),
        missing_u=rng.uniform(size=(size, size)),
        defect=dict(
            site=rng.uniform(),
            radius=rng.uniform(0.006, 0.011),
            amplitude=rng.choice([-1.0, 1.0]) * rng.uniform(0.002, 0.004),
            scratch=bool(rng.uniform() < 0.5),
            angle=rng.uniform(0.0, np.pi),
            aspect=rng.uniform(0.4, 1.0),
            tint=rng.uniform(0.0, 0.25, 3),
        ),
    )


def _texture(waves: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of 3 plane waves (wavelengths 6-30 mm), amplitude up to 0.06, (H, W)."""
    k = 2 * np.pi / (0.006 + 0.024 * waves[:, :2])
    phase = 2 * np.pi * waves[:, 2]
    amp = 0.06 * waves[:, 3]
    return sum(
        a * np.sin(kx * x + ky * y + p) for (kx, ky), p, a in zip(k, phase, amp, strict=True)
    )


def _shading(xyz: np.ndarray) -> np.ndarray:
    """Lambert shading (H, W) in [0.35, 1] from the normals of an organized cloud."""
    du = np.gradient(xyz, axis=1)
    dv = np.gradient(xyz, axis=0)
    normal = np.cross(du, dv)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
    normal *= -np.sign(normal[..., 2:3] + 1e-12)  # face the camera (towards -z)
    light = np.array([-0.3, -0.4, -1.0]) / np.linalg.norm([-0.3, -0.4, -1.0])
    return 0.35 + 0.65 * np.clip(normal @ light, 0.0, 1.0)


def _in_region(x: np.ndarray, y: np.ndarray, centre: np.ndarray, d: dict, kind: str) -> np.ndarray:
    """Pixels whose surface point lies in the defect region (disc, ellipse or scratch band)."""
    dx, dy = x - centre[0], y - centre[1]
    if kind == "dent":
        return np.hypot(dx, dy) < d["radius"]
    cos, sin = np.cos(d["angle"]), np.sin(d["angle"])
    along, across = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == "scratch":
        return (np.abs(along) < 1.6 * d["radius"]) & (np.abs(across) < 0.2 * d["radius"] + 0.0015)
    return (along / d["radius"]) ** 2 + (across / (d["aspect"] * d["radius"])) ** 2 < 1.0


def render_sample(
    cfg: SyntheticConfig,
    class_name: str,
    split: str,
    kind: str,
    index: int,
    *,
    with_defect: bool = True,
) -> dict[str, np.ndarray]:
    """Renders one sample: rgb uint8 (S, S, 3), xyz float32 (S, S, 3), mask bool (S, S).

    `kind` is "good" or a defect type; with_defect=False renders the same sample without it
    (same pose, colours, noise and missing points) and an empty mask.
    """
    size = cfg.image_size
    p = _draw(np.random.default_rng(_sample_seed(cfg, class_name, split, kind, index)), size)
    shape_height = lambda x, y: _height(class_name, x, y, p["pose"])
    clean = _cast_rays(size, shape_height, p["plane"])
    x, y = clean[..., 0], clean[..., 1]
    on_object = shape_height(x, y) > 0.0

    # Object and plane colours, textured and shaded from the defect-free geometry.
    hue = (_CLASS_HUES[class_name] + p["hue"]) % 1.0
    object_colour = _hsv_to_rgb(hue, 0.6, p["value"])
    base = np.where(on_object[..., None], object_colour, p["plane_grey"])
    texture = np.where(on_object, _texture(p["texture"][0], x, y), _texture(p["texture"][1], x, y))
    rgb = (base + texture[..., None]) * _shading(clean)[..., None]
    rgb = rgb * 255.0 + 2.0 * p["colour_noise"]

    xyz = clean
    mask = np.zeros((size, size), bool)
    d = p["defect"]
    if kind != "good" and with_defect:
        # Defect site: a pixel well inside the object, chosen by the sample's own draw.
        height = shape_height(x, y)
        candidates = np.flatnonzero(height >= 0.6 * height.max())
        centre = clean.reshape(-1, 3)[candidates[int(d["site"] * len(candidates))], :2]
        if kind in ("geometric", "both"):
            bump = lambda bx, by: (
                d["amplitude"]
                * np.maximum(
                    1.0 - (np.hypot(bx - centre[0], by - centre[1]) / d["radius"]) ** 2, 0.0
                )
                ** 2
                * (shape_height(bx, by) > 0.0)
            )
            dented = _cast_rays(
                size,
                lambda bx, by: np.maximum(shape_height(bx, by) + bump(bx, by), 0.0),
                p["plane"],
            )
            # The bump acts only on the object: pixels whose ray meets it there, before or after.
            dx_, dy_ = dented[..., 0], dented[..., 1]
            region = (on_object & _in_region(x, y, centre, d, "dent")) | (
                (shape_height(dx_, dy_) > 0.0) & _in_region(dx_, dy_, centre, d, "dent")
            )
            xyz = np.where(region[..., None], dented, clean)
            mask |= region
        if kind in ("colour", "both"):
            region = on_object & _in_region(x, y, centre, d, "scratch" if d["scratch"] else "stain")
            stain = np.where(object_colour >= 0.5, d["tint"], 1.0 - d["tint"]) * 255.0
            rgb = np.where(region[..., None], 0.3 * rgb + 0.7 * stain, rgb)
            mask |= region

    depth_scale = 1.0 + cfg.noise_std * p["depth_noise"] / xyz[..., 2]
    xyz = (xyz * depth_scale[..., None]).astype(np.float32)
    xyz[p["missing_u"] < cfg.missing_fraction] = 0.0
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return dict(rgb=rgb, xyz=xyz, mask=mask)


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sample_tasks(cfg: SyntheticConfig) -> list[tuple[str, str, str, int]]:
    counts = [("train", "good", cfg.num_train), ("validation", "good", cfg.num_validation)]
    counts += [("test", "good", cfg.num_test_good)]
    counts += [("test", kind, cfg.num_test_per_defect) for kind in DEFECT_TYPES]
    return [(c, s, k, i) for c in cfg.classes for s, k, n in counts for i in range(n)]


def _write_sample(args: tuple[SyntheticConfig, Path, tuple[str, str, str, int]]) -> None:
    cfg, root, (class_name, split, kind, index) = args
    sample = render_sample(cfg, class_name, split, kind, index)
    folder = root / class_name / split / kind
    stem = f"{index:03d}"
    rgb_image = Image.fromarray(sample["rgb"], "RGB")
    _write_atomic(folder / "rgb" / f"{stem}.png", lambda p: rgb_image.save(p, format="PNG"))
    _write_atomic(
        folder / "xyz" / f"{stem}.tiff",
        lambda p: tifffile.imwrite(p, sample["xyz"], photometric="rgb"),
    )
    if split == "test":
        code = DEFECT_CODES.get(kind, 0)
        gt = Image.fromarray(np.where(sample["mask"], code, 0).astype(np.uint8), "L")
        _write_atomic(folder / "gt" / f"{stem}.png", lambda p: gt.save(p, format="PNG"))


def _write_class_files(cfg: SyntheticConfig, root: Path, class_name: str) -> None:
    focal, cx, cy = camera_matrix(cfg.image_size)
    camera = dict(
        camera_type="pinhole",
        focal_px=focal,
        cx=cx,
        cy=cy,
        image_width=cfg.image_size,
        image_height=cfg.image_size,
    )
    ids = {str(code): kind for kind, code in DEFECT_CODES.items()} | {"0": "good"}
    for path, content in [
        (root / class_name / "calibration" / "camera_parameters.json", camera),
        (root / class_name / "class_ids.json", ids),
    ]:
        text = json.dumps(content, indent=2)
        _write_atomic(path, lambda p, text=text: Path(p).write_text(text))


def _marker(cfg: SyntheticConfig) -> dict:
    return dict(
        generator="lsfa_jax.data.synthetic", version=GENERATOR_VERSION, config=cfg.to_json()
    )


def is_generated(root: str | Path, cfg: SyntheticConfig) -> bool:
    """True when `root` holds a complete dataset generated from exactly `cfg`."""
    marker = Path(root) / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _marker(cfg)


def _run(tasks: Iterable, num_workers: int) -> None:
    if num_workers <= 1:
        for task in tasks:
            _write_sample(task)
        return
    with multiprocessing.get_context("spawn").Pool(
        num_workers, initializer=console.ignore_interrupt
    ) as pool:
        for _ in pool.imap_unordered(_write_sample, tasks, chunksize=8):
            pass


def generate_dataset(root: str | Path, cfg: SyntheticConfig, num_workers: int = 1) -> Path:
    """Writes the dataset for `cfg` to `root` (MVTec 3D-AD layout) and returns `root`.

    Nothing is done when `root` already holds this exact dataset. A folder that is not empty and
    has no synthetic marker is never touched; an older synthetic dataset there is replaced. The
    tree is built in a sibling temp folder and renamed into place, so `root` is never half-built.
    """
    root = Path(root)
    if is_generated(root, cfg):
        return root
    if root.exists() and not (root / MARKER).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty and not a synthetic dataset; refusing to write")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.tmp-")
    try:
        _run([(cfg, tmp, task) for task in _sample_tasks(cfg)], num_workers)
        for class_name in cfg.classes:
            _write_class_files(cfg, tmp, class_name)
        (tmp / MARKER).write_text(json.dumps(_marker(cfg), indent=2))
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
            os.replace(root, old / "data")
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
