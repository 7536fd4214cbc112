"""Knowledge distillation for FedEFM-style federated training: differentiable EMD similarity between
dense feature sets (``emd``) and distillation losses (``losses``)."""

from fedkd.distill.emd import dense_features_to_nodes, emd_marginals, emd_plan, emd_similarity, emd_weights
from fedkd.distill.losses import feature_kd, kd_kl, multishot_distill_loss

__all__ = [
  "dense_features_to_nodes",
  "emd_marginals",
  "emd_plan",
  "emd_similarity",
  "emd_weights",
  "feature_kd",
  "kd_kl",
  "multishot_distill_loss",
]
