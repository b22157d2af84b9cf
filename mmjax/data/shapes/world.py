"""The synthetic multimodal "shapes" world: scenes of 1-4 coloured shapes with exact ground truth.

Scene `index` of a split is a pure function of `(seed, split, index)`: any scene can be regenerated
at random access, and two runs give byte-identical scenes (with the same numpy version: numpy fixes
the PCG64 bit stream; its `Generator` methods have been stable but are not promised to be).

A scene (`generate_scene`) is a dict of numpy arrays, S = image size:

  rgb          uint8   [S, S, 3]  light, lightly noisy background; flat-coloured shapes
  depth        float32 [S, S]     depth of the visible surface; objects are planes facing the
                                  camera, the background a far wall (BACKGROUND_DEPTH top -> bottom)
  semseg       uint8   [S, S]     0 = background, 1 + index into SHAPES (see SEMSEG_CLASSES)
  instance     uint8   [S, S]     0 = background, 1 + object slot
  caption      str                e.g. "a large red circle in the top left and a small blue star at
                                  the bottom"
  det_boxes    float32 [K, 4]     box of each object's visible pixels, (xmin, ymin, xmax, ymax) in
                                  [0, 1] (pixel edges: a box of one pixel has width 1 / S)
  det_classes  int32   [K]        index into SHAPES
  num_objects  int32   []         K, in 1..MAX_OBJECTS
  obj_shape, obj_color, obj_size, obj_position
               int32   [4]        indices into SHAPES, COLORS, SIZES, POSITIONS; -1 in empty slots
  obj_center   float32 [4, 2]     (x, y) of the shape's centre pixel, (pixel + 0.5) / S; 0 if empty
  obj_depth    float32 [4]        depth of the object's plane; 0 in empty slots
  index        int64   []         the scene index

Objects fill slots nearest first. The caption's phrases and the det lists follow the same order, so
slot k, the k-th phrase of the caption and box k describe one object. Every object keeps at least
MIN_VISIBLE_FRACTION of its pixels visible, so each has a box and the caption is true of the image.
"""

import dataclasses
import functools
import operator
import re
import time

import numpy as np

from mmjax.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "brown")
SIZES = ("small", "large")
# A 3x3 grid over the image; index = 3 * row + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
POSITION_PHRASES = ("in the top left", "at the top", "in the top right", "on the left",
                    "in the center", "on the right", "in the bottom left", "at the bottom",
                    "in the bottom right")
SEMSEG_CLASSES = ("background",) + SHAPES
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
MAX_OBJECTS = 4
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024
MIN_VISIBLE_FRACTION = 0.5

# Every object colour has a channel <= 50 and the background has every channel >= 194, so colour
# alone tells objects from background.
COLOR_RGB = np.array([
    (220, 40, 40),   # red
    (40, 170, 60),   # green
    (40, 80, 220),   # blue
    (240, 210, 30),  # yellow
    (140, 50, 180),  # purple
    (245, 130, 20),  # orange
    (30, 200, 210),  # cyan
    (130, 80, 40),   # brown
], np.uint8)

_COLOR_V3 = COLOR_RGB.view("V3")[:, 0]  # one 3-byte item per colour

DEPTH_NEAR, DEPTH_FAR, DEPTH_GAP = 1.0, 7.0, 0.5  # object planes lie in [near, far], >= gap apart
BACKGROUND_DEPTH = (10.0, 8.5)  # a far wall that leans in slightly towards the bottom

_TEXTURE_SEED = 20251122
_NOISE = 6  # background noise amplitude in grey levels: the background stays in [194, 248]
_MIN_SEPARATION = 0.75  # centres at least this times the sum of half extents apart
_CANDIDATES = 16  # centre candidates drawn per object and attempt
_ATTEMPTS = 12  # layout attempts before the farthest object is dropped


class ShapesParameterError(UserError, ValueError):
  """A bad parameter of the shapes world; the message names the parameter."""


def require_int(name, value, minimum, maximum=None):
  """`value` as an int in [minimum, maximum], else ShapesParameterError naming `name`."""
  if isinstance(value, bool):
    raise ShapesParameterError(f"{name} must be an integer, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise ShapesParameterError(f"{name} must be an integer, got {value!r}") from None
  if value < minimum or (maximum is not None and value > maximum):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ShapesParameterError(f"{name} must be {bound}, got {value}")
  return value


def require_image_size(image_size):
  return require_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def require_split(split):
  if split not in SPLIT_IDS:
    raise ShapesParameterError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
  return split


# ---------------------------------------------------------------------------------------- assets --

def half_extents(image_size):
  """Half extent h of each size: a shape's template is (2h + 1) pixels square."""
  small = max(2, round(0.09 * image_size))
  return small, max(small + 2, round(0.16 * image_size))


def shape_mask(shape_id, half):
  """bool [2h+1, 2h+1]: the pixels of a shape centred in its template."""
  r = half + 0.5  # the shape reaches the template's outer pixel edges
  d = np.arange(-half, half + 1) / r
  v, u = np.meshgrid(d, d, indexing="ij")  # v grows downwards, u rightwards
  name = SHAPES[shape_id]
  if name == "circle":
    return u * u + v * v <= 1.0
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8  # inset, so its area is near a circle's
  if name == "diamond":
    return np.abs(u) + np.abs(v) <= 1.0
  if name == "triangle":  # apex up, base at v = 0.75
    return (v <= 0.75) & (np.abs(u) <= (v + 1.0) / 1.75)
  if name == "star":  # five points; fatter than a regular star so small stars stay stars
    sector, inner = 2 * np.pi / 5, 0.45
    theta = np.arctan2(u, -v)  # 0 at the top
    a = np.abs((theta + sector / 2) % sector - sector / 2)  # angle from the nearest tip
    x, y = np.hypot(u, v) * np.cos(a), np.hypot(u, v) * np.sin(a)
    qx, qy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # Inside iff on the centre's side of the edge from the tip (1, 0) to the inner vertex q.
    return (qx - 1.0) * y - qy * (x - 1.0) >= 0.0
  raise AssertionError(name)


@dataclasses.dataclass(frozen=True)
class _Assets:
  """What rendering at one image size reuses across scenes."""
  image_size: int
  halves: tuple  # half extent of each size
  masks: tuple  # masks[shape][size]: bool [2h+1, 2h+1]
  area_TZ: np.ndarray  # int [n_shapes, n_sizes]: pixels of each template
  texture_2S6S: np.ndarray  # uint8 [2S, 2S * 3]: grey noise as rows of (r, g, b)
  bg_depth_SS: np.ndarray  # float32 [S, S]


@functools.lru_cache(maxsize=8)
def _assets(image_size):
  halves = half_extents(image_size)
  masks = tuple(tuple(shape_mask(t, h) for h in halves) for t in range(len(SHAPES)))
  area = np.array([[m.sum() for m in row] for row in masks])
  texture_rng = np.random.default_rng(_TEXTURE_SEED)
  noise = texture_rng.integers(0, 2 * _NOISE + 1, (2 * image_size, 2 * image_size, 1), np.uint8)
  # Flat rows of (r, g, b): a window plus a tiled level is one contiguous add (a broadcast over a
  # last axis of 3 is ~8x slower).
  texture = np.repeat(noise, 3, axis=2).reshape(2 * image_size, 6 * image_size)
  top, bottom = BACKGROUND_DEPTH
  rows = np.linspace(top, bottom, image_size, dtype=np.float32)
  bg_depth = np.repeat(rows[:, None], image_size, axis=1)
  return _Assets(image_size, halves, masks, area, texture, bg_depth)


# ---------------------------------------------------------------------------------------- layout --

# Scenes hold at most 4 objects: plain Python is faster than numpy calls (microseconds each) on
# arrays this small, so placement works on Python ints and numpy only on whole images.

def _uniform_int(u, k):
  """A uniform float in [0, 1) to a uniform int in [0, k)."""
  return min(int(u * k), k - 1)


def _place(rng, halves, size):
  """Centres [(x, y)] keeping shapes inside the image and apart, or None."""
  centers = []
  for h, cand in zip(halves, rng.random((len(halves), _CANDIDATES, 2)).tolist()):
    span = size - 2 * h
    for ux, uy in cand:  # greedy: the first candidate far enough from the shapes placed so far
      x, y = h + _uniform_int(ux, span), h + _uniform_int(uy, span)
      if all((x - cx) ** 2 + (y - cy) ** 2 >= (_MIN_SEPARATION * (h + ch)) ** 2
             for (cx, cy), ch in zip(centers, halves)):
        centers.append((x, y))
        break
    else:
      return None
  return centers


def _paint_instances(assets, shapes, sizes, centers):
  """uint8 [S, S]: 1 + slot of the object seen at each pixel, 0 for background."""
  s = assets.image_size
  inst_SS = np.zeros((s, s), np.uint8)
  for k in reversed(range(len(shapes))):  # far to near: nearer objects overwrite farther ones
    h = assets.halves[sizes[k]]
    x, y = centers[k]
    inst_SS[y - h:y + h + 1, x - h:x + h + 1][assets.masks[shapes[k]][sizes[k]]] = k + 1
  return inst_SS


def _all_visible(assets, inst_SS, shapes, sizes, centers):
  """Whether every object shows at least MIN_VISIBLE_FRACTION of its pixels."""
  for k, ((x, y), shape, size) in enumerate(zip(centers, shapes, sizes)):
    h = assets.halves[size]
    window = inst_SS[y - h:y + h + 1, x - h:x + h + 1]  # object k is only ever painted here
    if np.count_nonzero(window == k + 1) < MIN_VISIBLE_FRACTION * assets.area_TZ[shape, size]:
      return False
  return True


def _visible_boxes(inst_SS, n):
  """int [N, 4] inclusive pixel boxes (x0, y0, x1, y1) of each object's visible pixels."""
  s = inst_SS.shape[0]
  vis_NSS = inst_SS == np.arange(1, n + 1, dtype=np.uint8)[:, None, None]
  seen_2NS = np.concatenate([vis_NSS.any(1), vis_NSS.any(2)])  # columns, then rows, with a pixel
  first_2N, last_2N = seen_2NS.argmax(1), s - 1 - seen_2NS[:, ::-1].argmax(1)
  return np.concatenate([first_2N, last_2N]).reshape(4, n).T


def _sample_layout(rng, assets, u):
  """Attributes, depths, centres and instance map of one scene's objects, nearest first.

  `u`: 1 + 4 * MAX_OBJECTS uniform floats, drawn at once with the scene's other ones.
  """
  n = 1 + _uniform_int(u[0], MAX_OBJECTS)
  attrs = [(_uniform_int(a, len(SHAPES)), _uniform_int(b, len(COLORS)), _uniform_int(c, len(SIZES)))
           for a, b, c in zip(u[1:13:3], u[2:13:3], u[3:13:3])]
  span = DEPTH_FAR - DEPTH_NEAR - (n - 1) * DEPTH_GAP
  depths = [DEPTH_NEAR + DEPTH_GAP * k + d * span for k, d in enumerate(sorted(u[13:13 + n]))]
  while True:
    shapes, colors, sizes = zip(*attrs[:n])
    halves = [assets.halves[z] for z in sizes]
    for _ in range(_ATTEMPTS):
      centers = _place(rng, halves, assets.image_size)
      if centers is None:
        continue
      inst_SS = _paint_instances(assets, shapes, sizes, centers)
      if _all_visible(assets, inst_SS, shapes, sizes, centers):
        return shapes, colors, sizes, depths[:n], centers, inst_SS
    n -= 1  # crowded (small images): drop the farthest object; one object always fits


# -------------------------------------------------------------------------------------- captions --

def position_index(x, y):
  """Index into POSITIONS of normalised coordinates in [0, 1]."""
  return 3 * min(2, int(y * 3)) + min(2, int(x * 3))


def format_caption(objects):
  """Caption of (size, colour, shape, position) name tuples, in the order given."""
  phrases = [f"a {size} {color} {shape} {POSITION_PHRASES[POSITIONS.index(position)]}"
             for size, color, shape, position in objects]
  if not phrases:
    raise ShapesParameterError("objects must not be empty")
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _alternatives(words):
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = (rf"a ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) ({_alternatives(SHAPES)}) "
              rf"({_alternatives(POSITION_PHRASES)})")
_CAPTION_RE = re.compile(rf"{_OBJECT_RE}(?:, {_OBJECT_RE})*(?: and {_OBJECT_RE})?")


def parse_caption(caption: str | bytes) -> list[tuple[str, str, str, str]]:
  """Inverse of `format_caption`: list of (size, colour, shape, position) name tuples.

  Accepts the UTF-8 bytes that tfds records hold; raises ValueError on anything else.
  """
  if isinstance(caption, bytes):
    caption = caption.decode()
  if not _CAPTION_RE.fullmatch(caption):
    raise ValueError(f"not a shapes caption: {caption!r}")
  return [(size, color, shape, POSITIONS[POSITION_PHRASES.index(phrase)])
          for size, color, shape, phrase in re.findall(_OBJECT_RE, caption)]


def scene_objects(scene):
  """(size, colour, shape, position) name tuples of a scene's objects, from its ground truth."""
  return [(SIZES[scene["obj_size"][k]], COLORS[scene["obj_color"][k]],
           SHAPES[scene["obj_shape"][k]], POSITIONS[scene["obj_position"][k]])
          for k in range(int(scene["num_objects"]))]


# ---------------------------------------------------------------------------------------- scenes --

def generate_scene(index: int, *, seed: int = 0, split: str = "train",
                   image_size: int = 64) -> dict:
  """Scene `index` of `split`: a dict of modalities and ground truth (see the module docstring)."""
  index = require_int("index", index, 0)
  seed = require_int("seed", seed, 0)
  split = require_split(split)
  assets = _assets(require_image_size(image_size))
  s = assets.image_size

  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  u = rng.random(1 + 4 * MAX_OBJECTS + 6).tolist()  # one draw: Generator calls cost microseconds
  shapes, colors, sizes, depths, centers, inst_SS = _sample_layout(rng, assets, u[:-6])
  n = len(shapes)
  shape_N, color_N = np.array(shapes, np.int32), np.array(colors)
  depth_N, centers_N2 = np.array(depths, np.float32), np.array(centers)

  oy, ox, grey = (_uniform_int(v, k) for v, k in zip(u[-6:-3], (s, s, 31)))
  level_S3 = np.empty((s, 3), np.uint8)  # a row of light grey, faintly tinted, pixels
  level_S3[:] = [194 + grey + _uniform_int(v, 13) for v in u[-3:]]
  window_S3S = assets.texture_2S6S[oy:oy + s, 3 * ox:3 * (ox + s)]
  rgb_SS3 = (window_S3S + level_S3.reshape(-1)).reshape(s, s, 3)
  fg_SS = inst_SS > 0
  inst_F = inst_SS[fg_SS]  # 1 + object slot of each foreground pixel
  # Viewing pixels as 3-byte items makes this one copy per pixel instead of three strided ones.
  rgb_SS3.view("V3")[..., 0][fg_SS] = _COLOR_V3.take(np.concatenate(([0], color_N)).take(inst_F))
  depth_SS = assets.bg_depth_SS.copy()
  depth_SS[fg_SS] = np.concatenate((np.zeros(1, np.float32), depth_N)).take(inst_F)
  semseg_SS = np.concatenate(([0], shape_N + 1)).astype(np.uint8).take(inst_SS)

  # The grid cell of each centre pixel; integer arithmetic keeps cells exact at the borders.
  positions = [3 * min(2, (6 * y + 3) // (2 * s)) + min(2, (6 * x + 3) // (2 * s))
               for x, y in centers]
  caption = format_caption([(SIZES[z], COLORS[c], SHAPES[t], POSITIONS[p])
                            for t, c, z, p in zip(shapes, colors, sizes, positions)])
  ids_4M = np.full((4, MAX_OBJECTS), -1, np.int32)  # padded rows: shape, colour, size, position
  ids_4M[:, :n] = (shapes, colors, sizes, positions)
  center_M2 = np.zeros((MAX_OBJECTS, 2), np.float32)
  center_M2[:n] = (centers_N2 + 0.5) / s
  depth_M = np.zeros(MAX_OBJECTS, np.float32)
  depth_M[:n] = depth_N
  boxes_N4 = (_visible_boxes(inst_SS, n) + np.array([0, 0, 1, 1])) / s  # pixel edges
  boxes_N4 = boxes_N4.astype(np.float32)
  return {
      "index": np.int64(index),
      "rgb": rgb_SS3,
      "depth": depth_SS,
      "semseg": semseg_SS,
      "instance": inst_SS,
      "caption": caption,
      "det_boxes": boxes_N4,
      "det_classes": shape_N,
      "num_objects": np.int32(n),
      "obj_shape": ids_4M[0],
      "obj_color": ids_4M[1],
      "obj_size": ids_4M[2],
      "obj_position": ids_4M[3],
      "obj_center": center_M2,
      "obj_depth": depth_M,
  }


class SceneSource:
  """`num_scenes` scenes of a split generated on demand; Grain's random-access source protocol."""

  def __init__(self, num_scenes, *, seed=0, split="train", image_size=64):
    self.num_scenes = require_int("num_scenes", num_scenes, 0)
    self.seed = require_int("seed", seed, 0)
    self.split = require_split(split)
    self.image_size = require_image_size(image_size)

  def __len__(self):
    return self.num_scenes

  def __getitem__(self, index):
    if not 0 <= index < self.num_scenes:
      raise IndexError(f"scene {index} out of range for {self.num_scenes} scenes")
    return generate_scene(index, seed=self.seed, split=self.split, image_size=self.image_size)

  def __repr__(self):
    return (f"SceneSource(num_scenes={self.num_scenes}, seed={self.seed}, split={self.split!r}, "
            f"image_size={self.image_size})")


def benchmark_generation(num_scenes: int, image_size: int = 64, seed: int = 0) -> dict:
  """Scenes generated per second on this thread: {"scenes_per_s", "seconds", ...}."""
  num_scenes = require_int("num_scenes", num_scenes, 1)
  generate_scene(0, seed=seed, image_size=image_size)  # builds the per-size assets untimed
  start = time.perf_counter()
  for i in range(num_scenes):
    generate_scene(i, seed=seed, image_size=image_size)
  seconds = time.perf_counter() - start
  return {"scenes_per_s": num_scenes / seconds, "seconds": seconds, "num_scenes": num_scenes,
          "image_size": image_size}
