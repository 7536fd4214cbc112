"""Benchmarks of the federated round and its convolutions; not part of the installed ``fedkd`` package.

Run them from the repository root (bench/README.md):

  python -m bench                                  # the round against the centralized ceiling (JSON lines)
  python -m bench --measure --config=configs/quickstart.py   # the fastest layout x lowering for a config
  python -m bench.conv                             # one client-batched conv layer, per formulation and pass
  bash bench/gpu.sh                                # the GPU measurements in one device call
  python bench/hlo_report.py DUMP_DIR              # does XLA:GPU fuse the im2col patches into its GEMMs?
"""
