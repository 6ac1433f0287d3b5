"""The engine below the tasks: device, precision and threads, distributed set-up, the run directory
(`run_dir.RunDir`: every file name of a run), checkpoints, optimisers and schedules, metrics and
FLOPs, the one training step (`step.TrainStep`) and the loop that pretraining, linear probing and
fine-tuning share. It imports the model (and `m3ae.config`, `m3ae.utils`), never data, a task, or
anything above."""
