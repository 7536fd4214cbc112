"""Distillation losses for FedEFM-style multishot federated distillation.

FedEFM (Sec. "Knowledge distillation") distils the returned overseas experts (teachers) into the local
model (student) on the local batch:

    L_MD = beta * T^2 * sum_j w_j * L(Q^T_student, Q^T_expert_j) + (1 - beta) * L_seg,

with temperature-softened softmax outputs Q^T = softmax(logits / T). The paper does not fix the soft
loss; here it is the Hinton KL(teacher || student), whose gradient equals that of the soft
cross-entropy, and w_j are the (EMD) neighbour weights.

All losses compute in float32 and are jit-, vmap- and grad-able. Logits are [..., K] (e.g. per-pixel
segmentation logits [B, H, W, K]); "mean over pixels" is the mean over every leading axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_temperature(T) -> None:
  if isinstance(T, (int, float)) and not (0 < T < float("inf")):
    raise ValueError(f"KD temperature T={T!r} must be a finite number > 0")


def _kl(s: jax.Array, t: jax.Array, T) -> jax.Array:
  """Per-pixel KL(softmax(t / T) || softmax(s / T)) over the last axis (float32, no T^2).

  With d = (s - t) / T centred under p_t (dc = d - sum p_t d), KL = log sum_k p_t,k exp(dc_k)
  = log1p(sum_k p_t,k phi(dc_k)), phi(x) = exp(x) - 1 - x >= 0. Where every |dc| <= 0.5 (the softened
  distributions are close: always at a large T) the series of phi to x^8 / 8! (truncation < 1e-7 relative)
  keeps full relative precision, which the difference of two float32 logs loses (T^2 KL errs by ~10 % at
  T = 1e4 and can turn negative at T = 1e6); elsewhere the direct sum of p_t (log p_t - log p_s) is used.
  """
  log_ps = jax.nn.log_softmax(s / T, axis=-1)
  log_pt = jax.nn.log_softmax(t / T, axis=-1)
  p_t = jnp.exp(log_pt)
  direct = jnp.sum(p_t * (log_pt - log_ps), axis=-1)
  d = (s - t) / T
  dc = d - jnp.sum(p_t * d, axis=-1, keepdims=True)
  near = jnp.max(jnp.abs(dc), axis=-1) <= 0.5
  x = jnp.where(near[..., None], dc, 0.0)  # outside the series' range it is not evaluated (finite gradients)
  phi = 0.5 * x * x * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6 * (1 + x / 7 * (1 + x / 8))))))
  series = jnp.log1p(jnp.sum(p_t * phi, axis=-1))
  return jnp.where(near, series, direct)


def kd_kl(
  student_logits: jax.Array, teacher_logits: jax.Array, T: float = 1.0, *, detach_teacher: bool = True
) -> jax.Array:
  """T^2 * mean over pixels of KL(softmax(teacher / T) || softmax(student / T)).

  Logits are [..., K]; the KL is summed over the class axis and averaged over all other axes.
  ``detach_teacher`` stops gradients into the teacher logits (the experts are fixed teachers).
  """
  _check_temperature(T)
  s = student_logits.astype(jnp.float32)
  t = teacher_logits.astype(jnp.float32)
  if detach_teacher:
    t = jax.lax.stop_gradient(t)
  return (T * T) * jnp.mean(_kl(s, t, T))


def multishot_distill_loss(
  student_logits: jax.Array,
  expert_logits: jax.Array,
  weights: jax.Array,
  seg_loss_value: jax.Array,
  beta: float,
  T: float = 1.0,
  return_kd: bool = False,
):
  """beta * sum_j w_j * kd_kl(student, expert_j, T) + (1 - beta) * seg_loss_value; with ``return_kd``
  (that loss, its KD part sum_j w_j * kd_kl(...)).

  student_logits [..., K]; expert_logits [J, ..., K] (one row per returned expert); weights [J]
  (e.g. ``fedkd.distill.emd.emd_weights``; padded experts get weight 0); seg_loss_value: the
  already-computed supervised segmentation loss of the student (scalar).
  """
  per_expert = jax.vmap(lambda e: kd_kl(student_logits, e, T))(expert_logits)
  kd = jnp.sum(jnp.asarray(weights, jnp.float32) * per_expert)
  loss = beta * kd + (1.0 - beta) * jnp.asarray(seg_loss_value, jnp.float32)
  return (loss, kd) if return_kd else loss


def feature_kd(student_feats: jax.Array, teacher_feats: jax.Array, *, detach_teacher: bool = True) -> jax.Array:
  """Feature distillation on [..., C] feature maps of equal shape.

  Each channel vector (last axis) is L2-normalised, then the loss is the mean over positions (all
  leading axes) of the squared Euclidean distance between the normalised student and teacher vectors,
  i.e. mean(2 - 2 cos(s, t)) in [0, 4]; it is invariant to the feature scale of either model. Zero
  vectors normalise to zero. ``detach_teacher`` stops gradients into the teacher features.
  """
  s = student_feats.astype(jnp.float32)
  t = teacher_feats.astype(jnp.float32)
  if detach_teacher:
    t = jax.lax.stop_gradient(t)
  return jnp.mean(jnp.sum((_unit(s) - _unit(t)) ** 2, axis=-1))


def _unit(x: jax.Array) -> jax.Array:
  """``x`` / ||x|| over the last axis (zero vectors stay zero). A vector whose squared norm passes 1e20,
  or is below 1e-20, is first divided by a power of two at least its largest entry: else the squared norm
  overflows float32 (entries past ~1e19), the gradient of its rsqrt (||x||^-3) underflows, or a tiny
  vector's squared norm underflows (norms below ~1e-12 came out longer than 1). The result does not depend
  on that scale, so it is held constant for the gradient."""
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  big = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  # 2^-k with big in [2^(k-1), 2^k), |k| <= 126: a normal float (1 / big past 2^126 is subnormal, flushed to 0);
  # a zero vector has k = 0
  inverse = jnp.ldexp(jnp.float32(1), -jnp.clip(jnp.frexp(big)[1], -126, 126))
  x = x * jax.lax.stop_gradient(jnp.where((squares <= 1e20) & (squares >= 1e-20), 1.0, inverse))
  norm2 = jnp.sum(x * x, axis=-1, keepdims=True)
  # an exact zero vector stays zero with a zero gradient (a floor on norm2 gave it a 1e12 gradient)
  return x * jnp.where(norm2 > 0, jax.lax.rsqrt(jnp.where(norm2 > 0, jnp.maximum(norm2, 1e-24), 1.0)), 0.0)


def masked_kd_kl(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  T: float = 1.0,
  confidence: float = 0.0,
  class_balance: bool = False,
) -> jax.Array:
  """Pixel KD restricted to where the teacher is sure, optionally class-balanced.

  The per-pixel T^2 KL(softmax(teacher / T) || softmax(student / T)) (teacher detached) is averaged
  over the pixels whose teacher top-class probability (at T = 1) is >= ``confidence``. With
  ``class_balance`` each such pixel is weighted by 1 / (number of kept pixels of its teacher class)
  and the classes present count equally, so a thin structure (~1 % of the pixels) teaches as much as
  the background. Returns 0 when no pixel is kept. Logits are [..., K].
  """
  _check_temperature(T)
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  kl = (T * T) * _kl(s, t, T)  # [...]
  p1 = jax.nn.softmax(t, axis=-1)
  keep = (jnp.max(p1, axis=-1) >= confidence).astype(jnp.float32)
  if class_balance:
    onehot = jax.nn.one_hot(jnp.argmax(t, axis=-1), t.shape[-1], dtype=jnp.float32) * keep[..., None]
    counts = jnp.sum(onehot.reshape(-1, t.shape[-1]), axis=0)  # kept pixels per teacher class
    present = jnp.sum(counts > 0)
    per_class = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0) / jnp.maximum(present, 1)
    w = jnp.sum(onehot * per_class, axis=-1)
  else:
    w = keep / jnp.maximum(jnp.sum(keep), 1.0)
  return jnp.sum(w * kl)
