"""CLIP training, with or without a teacher: the loop (`trainer`), AdamW with CLIP's parameter groups and the
learning-rate schedule (`optim`) and `clipkd train` (`commands`). The objectives are in distill/, the run machinery
(process group, guard, checkpoints, run logs) in engine/."""
