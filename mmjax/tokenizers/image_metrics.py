"""Reconstruction quality and codebook usage of image-like tokenizers (numpy, on the host).

  psnr            mean over images of 10 log10(255^2 / MSE) of uint8 rgb (an image's MSE is
                  floored at 1e-3, so a perfect image counts as 78 dB rather than infinity)
  depth_abs_rel   mean over pixels of |pred - true| / true
  semseg          pixel accuracy and mIoU (mean over the classes present in truth or prediction)
  codebook usage  fraction of the codes used at least once, and perplexity exp(H) of the code
                  histogram
"""

from __future__ import annotations

import jax
import numpy as np

MIN_MSE = 1e-3


def psnr(pred_BHWC: np.ndarray, true_BHWC: np.ndarray) -> float:
  """Mean per-image PSNR in dB of uint8 images."""
  diff = np.asarray(pred_BHWC, np.float64) - np.asarray(true_BHWC, np.float64)
  mse_B = np.maximum(np.mean(diff.reshape(diff.shape[0], -1) ** 2, axis=1), MIN_MSE)
  return float(np.mean(10.0 * np.log10(255.0 ** 2 / mse_B)))


def depth_abs_rel(pred: np.ndarray, true: np.ndarray) -> float:
  """Mean absolute relative error over pixels with positive true depth."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  valid = true > 0
  return float(np.mean(np.abs(pred[valid] - true[valid]) / true[valid]))


def confusion_matrix(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [C, C]: counts of (true class, predicted class) pixel pairs."""
  pred, true = np.asarray(pred, np.int64).ravel(), np.asarray(true, np.int64).ravel()
  return np.bincount(true * num_classes + pred, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def semseg_scores(confusion: np.ndarray) -> dict[str, float]:
  """Pixel accuracy and mIoU of a confusion matrix; classes absent from both sides are skipped."""
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  return {"pixel_acc": float(tp.sum() / max(confusion.sum(), 1)),
          "miou": float(np.mean(tp[present] / union[present])) if present.any() else 0.0}


def codebook_usage(ids: np.ndarray, codebook_size: int) -> dict[str, float]:
  """Fraction of codes used and perplexity (exp of the entropy of the code histogram)."""
  counts = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=codebook_size)
  p = counts[counts > 0] / counts.sum()
  return {"codes_used": float(np.count_nonzero(counts) / codebook_size),
          "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


def evaluate_image_tokenizer(model, images: np.ndarray, *,
                             batch_size: int = 64) -> dict[str, float]:
  """Reconstruction metrics of the tokenizer's modality and codebook usage over `images`.

  `model` is an `ImageTokenizer`; `images` a batch in its raw format (all of them are encoded and
  decoded, `batch_size` at a time; the last batch is padded to keep one compiled shape).
  """
  images = np.asarray(images)
  model.check_images(images)
  n = images.shape[0]
  if n == 0:
    raise ValueError("evaluate_image_tokenizer needs at least one image")
  ids, recon = [], []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0] if n > batch_size else 0
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    ids_b, recon_b = jax.device_get(model.reconstruct(chunk))
    keep = chunk.shape[0] - pad
    ids.append(ids_b[:keep])
    recon.append(recon_b[:keep])
  ids, recon = np.concatenate(ids), np.concatenate(recon)
  modality = model.cfg.modality
  metrics: dict[str, float] = {"num_images": float(n)}
  if modality == "rgb":
    metrics["psnr"] = psnr(recon, images)
  elif modality == "depth":
    metrics["depth_abs_rel"] = depth_abs_rel(recon, images)
  else:
    metrics.update(semseg_scores(confusion_matrix(recon, images, model.cfg.num_classes)))
  metrics.update(codebook_usage(ids, model.codebook_size))
  return metrics


def reconstructions(model, images: np.ndarray) -> np.ndarray:
  """Raw-format reconstructions of a (small) batch of images."""
  return np.asarray(jax.device_get(model.reconstruct(np.asarray(images))[1]))
