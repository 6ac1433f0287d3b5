"""The engine below the tasks: device, precision and threads, distributed set-up, the run
directory, checkpoints, optimisers and schedules, metrics and FLOPs, and the loop skeleton that
pretraining, linear probing and fine-tuning share. It imports model and data, never a task."""
