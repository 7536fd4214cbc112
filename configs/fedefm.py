"""FedEFM end to end: foundation pretraining across silos with unseen data types, then a student
fine-tuned on an unseen hospital; results table over methods x seeds + unseen-label-% ablation.

  python -m fedkd.main --config=configs/fedefm.py:runlocal --workdir=runs/fedefm_local   # CPU
  python -m fedkd.main --config=configs/fedefm.py --workdir=runs/fedefm                  # one GPU
Variants (comma-separated): runlocal, source (track A: the foundation classifies the data source),
ablation (adds the 0/25/50/75 % unseen rows), tiny (tests), seeds=N.

Ctrl-C or SIGTERM stops after the current pretraining round and saves it; re-running the same command
resumes inside the run it was in (checkpoints every --config.checkpoint.every rounds under
<workdir>/checkpoints/; finished runs are kept in results_raw.jsonl and skipped).
"""

from fedkd.config import FLAG, SEEDS, fedefm_base_config, parse_arg

ARGS = {"runlocal": FLAG, "source": FLAG, "ablation": FLAG, "tiny": FLAG, "seeds": SEEDS}


def get_config(arg=None):
  a = parse_arg(arg, ARGS, __file__)
  c = fedefm_base_config()
  # GPU-sized default: 64 px, bigger ViT, longer pretraining.
  c.image_size = 64
  c.pretrain.num_rounds = 200
  c.pretrain.local_steps = 2
  c.pretrain.batch_size = 8
  c.pretrain.examples_per_silo = 2048
  for m in (c.teacher, c.student):
    m.image_size = 64
    m.patch_size = 8
    m.hidden = 128
    m.num_heads = 4
    m.mlp_dim = 256
    m.stem_width = 32
  c.teacher.num_layers = 6
  c.teacher.decoder_width = 64
  c.student.num_layers = 6  # the whole foundation encoder; a smaller decoder
  c.student.decoder_width = 32
  c.downstream.train_examples = 256
  c.downstream.test_examples = 128
  c.downstream.steps = 600
  c.downstream.batch_size = 16
  if a.get("runlocal", False):  # 2 CPU cores, < 30 minutes: fedkd.config defaults (32 px, tiny ViT)
    c = fedefm_base_config()
  if a.get("tiny", False):  # tests: seconds per run
    c = fedefm_base_config()
    c.image_size = 16
    c.pretrain.num_silos = 4
    c.pretrain.num_rounds = 2
    c.pretrain.local_steps = 1
    c.pretrain.batch_size = 2
    c.pretrain.examples_per_silo = 16
    for m in (c.teacher, c.student):
      m.image_size, m.patch_size, m.hidden, m.mlp_dim, m.stem_width, m.num_heads = 16, 4, 8, 16, 4, 2
    c.teacher.decoder_width = c.student.decoder_width = 4
    c.fedefm.emd_iters = 10
    c.downstream.train_examples = 8
    c.downstream.test_examples = 4
    c.downstream.steps = 3
    c.downstream.batch_size = 2
    c.downstream.val_examples = 4
    c.downstream.scarce_examples = "4"
    c.downstream.scarce_steps = 2
    c.downstream.teacher_adapt_steps = 2
    c.downstream.kd_scales = "0.1,1"
    c.experiment.seeds = "0"
    c.experiment.methods = "scratch,fedavg,fedefm"
    c.experiment.kd_methods = "fedefm"
    c.experiment.ablation_percents = ""
  if a.get("source", False):  # track A: source classification (the same silos, rounds and optimiser)
    c.pretrain.objective = "source"
  if a.get("ablation", False):
    c.experiment.ablation_percents = "0,25,50,75"
  if "seeds" in a:
    c.experiment.seeds = ",".join(str(s) for s in range(a["seeds"]))
  # the generator's forward model and the random streams of every table in docs/fedefm.md (the schema's defaults
  # are 2: the corrected generator, and streams seeded apart from the silos' round sampling; fedkd/streams.py)
  c.data.synthetic_physics = 1
  c.rng_streams = 1
  return c
