"""A small folder of real-looking 128-px images with captions, written by the tests: smooth colour
gradients, noise textures and filled shapes over them, as PNG and JPEG, with same-stem .txt files."""

import os

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (50, 80, 220),
           "yellow": (235, 210, 50), "purple": (140, 60, 170), "orange": (240, 140, 30)}


def render(i: int, size: int = 128) -> tuple[np.ndarray, str]:
  """Image i and its caption: a gradient background, noise on odd images, a shape on most."""
  rng = np.random.default_rng(i)
  names = list(COLOURS)
  first, second = (names[k] for k in rng.choice(len(names), 2, replace=False))
  a, b = np.array(COLOURS[first], np.float32), np.array(COLOURS[second], np.float32)
  t = np.linspace(0.0, 1.0, size, dtype=np.float32)
  ramp = t[None, :, None] if i % 2 else t[:, None, None]
  image = a * (1 - ramp) + b * ramp + np.zeros((size, size, 1), np.float32)
  words = [f"a {first} to {second} gradient"]
  if i % 3 == 1:
    image += rng.normal(0.0, 25.0, image.shape)
    words.append("with grainy noise")
  if i % 4 != 3:
    colour = names[int(rng.integers(len(names)))]
    yy, xx = np.mgrid[:size, :size]
    cy, cx = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    r = int(rng.integers(size // 10, size // 4))
    if i % 2:
      inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
      shape = "circle"
    else:
      inside = (abs(yy - cy) < r) & (abs(xx - cx) < r)
      shape = "square"
    image[inside] = COLOURS[colour]
    words.append(f"and a {colour} {shape}")
  return np.clip(image, 0, 255).astype(np.uint8), " ".join(words)


def write_folder(root: str, num_train: int, num_val: int, size: int = 128) -> str:
  """<root>/train and <root>/validation of rendered images + captions; returns root."""
  k = 0
  for split, n in (("train", num_train), ("validation", num_val)):
    if not n:
      continue
    directory = os.path.join(root, split)
    os.makedirs(directory, exist_ok=True)
    for _ in range(n):
      image, caption = render(k, size)
      ext = "jpg" if k % 3 == 0 else "png"
      Image.fromarray(image).save(os.path.join(directory, f"img{k:03d}.{ext}"))
      with open(os.path.join(directory, f"img{k:03d}.txt"), "w") as f:
        f.write(caption + "\n")
      k += 1
  return root
