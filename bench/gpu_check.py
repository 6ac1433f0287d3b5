"""One command for a machine with one CUDA GPU (issue 17 item 6), about 8 minutes, one JSON file:

    python bench/gpu_check.py [--out gpu_check.json]

- parity: a forward/backward of the same model, batch and masks on the GPU and on the CPU (fp32,
  TF32 off): relative difference of the loss and of every gradient;
- mfu: `m3ae bench` of base at 224 px in bf16 at doubling batch sizes until the GPU is full (out of
  memory or a smaller gain than 5 %), against the bf16 matmul peak bench measures in-process;
- compile: the same bench with `--compile true` and without, at the largest batch that fitted, the
  processes' wall time beside the step time (compile time is the difference, less the steps);
- data: JPEG shards written by `m3ae data build` from generated pictures, then `m3ae pretrain` of
  base-224 reading them with 8 and 16 loader workers: the share of the step spent waiting for data
  (`data_wait` of metrics.jsonl, the first log window left out);
- distributed: one training step under DDP and under FSDP2 on a process group of one, against the
  same step on the bare model.

Every section is written to the JSON as soon as it ends, an error as {"error": ...}, so a section
that fails or a run cut short still leaves the others. `--device cpu --smoke` runs the same logic
on the CPU with a tiny model in seconds (tests/test_gpu_check.py); compile is skipped there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.engine.distributed import DistInfo, wrap_model
from m3ae.engine.flops import measure_peak_flops
from m3ae.engine.metrics import read_metrics
from m3ae.train.synthetic import synthetic_batch

FULL = dict(preset="base", image_size=224, text_length=64, batches=(64, 128, 256, 512, 1024), steps=20,
            pictures=4096, picture_size=(320, 256), workers=(8, 16), train_batch=256)
SMOKE = dict(preset="tiny", image_size=32, text_length=16, batches=(2, 4), steps=2, pictures=24, picture_size=(48, 40),
             workers=(2,), train_batch=8)


def m3ae_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3ae.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def model_config(s: dict) -> M3AEConfig:
    return M3AEConfig.from_preset(s["preset"], image_size=s["image_size"], text_length=s["text_length"])


def loss_and_grads(model: torch.nn.Module, batch: dict, noise: tuple, device: torch.device):
    batch = {k: v.to(device) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    out = model(image=batch["image"], text=batch["text"], text_padding_mask=batch["text_padding_mask"],
                image_noise=noise[0].to(device), text_noise=noise[1].to(device))
    out.loss.backward()
    return out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check_parity(s: dict, device: torch.device) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = model_config(s)
    torch.manual_seed(0)
    reference = M3AE(cfg)
    on_device = M3AE(cfg).to(device)
    on_device.load_state_dict(reference.state_dict())
    batch = synthetic_batch(cfg, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(4, cfg.num_patches, generator=g), torch.rand(4, cfg.text_length, generator=g))
    loss_cpu, grads_cpu = loss_and_grads(reference, batch, noise, torch.device("cpu"))
    loss_dev, grads_dev = loss_and_grads(on_device, batch, noise, device)
    worst = max(grads_cpu, key=lambda n: relative(grads_dev[n], grads_cpu[n]))
    result = {"loss_cpu": loss_cpu.item(), "loss_device": loss_dev.item(),
              "loss_relative_difference": relative(loss_dev, loss_cpu),
              "worst_gradient": worst, "worst_gradient_relative_difference": relative(grads_dev[worst], grads_cpu[worst]),
              "gradients_compared": len(grads_cpu)}
    result["ok"] = result["loss_relative_difference"] < 1e-4 and result["worst_gradient_relative_difference"] < 1e-3
    return result


def bench(s: dict, device: str, batch: int, *extra: str) -> dict:
    start = time.perf_counter()
    done = m3ae_cli("bench", "--preset", s["preset"], "--image-size", str(s["image_size"]), "--text-length",
                    str(s["text_length"]), "--batch-size", str(batch), "--precision", "bf16", "--device", device,
                    "--steps", str(s["steps"] // 2), "--warmup", "2", "--json", *extra)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"batch_size": batch, "failed": done.stderr.strip().splitlines()[-1:] or ["?"], "wall_s": wall}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def check_mfu(s: dict, device: str) -> dict:
    """Doubling batches until one does not fit or gains under 5 % samples/s: the GPU is full."""
    runs = []
    for batch in s["batches"]:
        run = bench(s, device, batch)
        runs.append(run)
        if "failed" in run or (len(runs) > 1 and "failed" not in runs[-2]
                               and run["samples_per_s"] < 1.05 * runs[-2]["samples_per_s"]):
            break
    fitted = [r for r in runs if "failed" not in r]
    best = max(fitted, key=lambda r: r["samples_per_s"]) if fitted else None
    return {"runs": runs, "best": best, "mfu": best and best["mfu"], "largest_batch": fitted[-1]["batch_size"] if fitted else None,
            "peak_bf16_flops_per_s": measure_peak_flops(torch.device(device), "bf16")}


def check_compile(s: dict, device: str, batch: int) -> dict:
    eager, compiled = bench(s, device, batch), bench(s, device, batch, "--compile", "true")
    result = {"eager": eager, "compiled": compiled}
    if "failed" not in eager and "failed" not in compiled:
        steps = s["steps"] // 2 + 2
        result["speedup"] = eager["step_s"] / compiled["step_s"]
        result["compile_s"] = (compiled["wall_s"] - eager["wall_s"]) - steps * (compiled["step_s"] - eager["step_s"])
    return result


def write_pictures(root: Path, s: dict) -> Path:
    """Smooth colour fields with noise (JPEG sizes like photographs', not like flat colour) and a
    caption each, listed in a JSONL manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = s["picture_size"]
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    rows = []
    for i in range(s["pictures"]):
        a, b, c = rng.uniform(0, 6, 3)
        field = np.stack([np.sin(a * xs + b * ys + k * c) for k in range(3)], -1)
        pixels = np.clip(127 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = root / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        rows.append({"image": path.name, "caption": f"a picture of waves number {i % 97}", "label": i % 10})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def check_data(s: dict, device: str, work: Path) -> dict:
    pictures = work / "pictures"
    pictures.mkdir()
    manifest = write_pictures(pictures, s)
    # at least two shards per loader worker: the loader refuses workers that would get none
    shard_size = max(s["pictures"] // (2 * max(s["workers"])), 1)
    built = m3ae_cli("data", "build", "--data.source", str(manifest), "--out-dir", str(work / "shards"),
                     "--shard-size", str(shard_size))
    if built.returncode:
        raise RuntimeError(f"m3ae data build: {built.stderr.strip()[-500:]}")
    result = {"pictures": s["pictures"], "picture_size": s["picture_size"],
              "shard_bytes": sum(p.stat().st_size for p in (work / "shards").glob("*.tar")), "runs": []}
    for workers in s["workers"]:
        run = work / f"run-{workers}"
        done = m3ae_cli("pretrain", "--preset", s["preset"], "--model.image_size", str(s["image_size"]),
                        "--data.source", str(work / "shards" / "*.tar"), "--data.num_workers", str(workers),
                        "--batch-size", str(s["train_batch"]), "--train.total_steps", str(3 * s["steps"]),
                        "--precision", "bf16", "--device", device, "--log.every", str(max(s["steps"] // 2, 1)),
                        "--log.progress", "false", "--checkpoint.every", "1000000", "--out-dir", str(run))
        if done.returncode:
            result["runs"].append({"workers": workers, "failed": done.stderr.strip()[-500:]})
            continue
        windows = read_metrics(run / "metrics.jsonl")[1:] or read_metrics(run / "metrics.jsonl")
        result["runs"].append({"workers": workers, "data_wait": float(np.mean([w["data_wait"] for w in windows])),
                               "samples_per_s": float(np.mean([w["samples_per_s"] for w in windows if "samples_per_s" in w] or [0])),
                               "windows": len(windows)})
    return result


@dataclass
class OneRank(DistInfo):
    """A process group of one, wrapped anyway: DDP's and FSDP2's code paths on a single GPU."""

    @property
    def enabled(self) -> bool:
        return True


def check_distributed(s: dict, device: torch.device) -> dict:
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        cfg = model_config(s)
        batch = synthetic_batch(cfg, 4, seed=0)
        g = torch.Generator().manual_seed(1)
        noise = (torch.rand(4, cfg.num_patches, generator=g), torch.rand(4, cfg.text_length, generator=g))
        torch.manual_seed(0)
        bare = M3AE(cfg).to(device)
        loss_bare, _ = loss_and_grads(bare, batch, noise, device)
        result = {}
        for parallel in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = M3AE(cfg).to(device)
            wrapped = wrap_model(model, OneRank(0, 1, 0, device), parallel, None)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            start = time.perf_counter()
            loss, grads = loss_and_grads(wrapped, batch, noise, device)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result[parallel] = {"wrapper": type(wrapped).__name__, "step_s": time.perf_counter() - start,
                                "loss": loss.item(), "loss_relative_difference": relative(loss, loss_bare),
                                "gradients": len(grads)}
        result["ok"] = all(result[p]["loss_relative_difference"] < 1e-5 for p in ("ddp", "fsdp"))
        return result
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu with --smoke (its test)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: the logic in seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this check is for a GPU machine (--device cpu --smoke tests its logic)")
    s = SMOKE if args.smoke else FULL
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cuda": torch.version.cuda, "sections": {}}
    out = Path(args.out)
    start = time.perf_counter()

    def section(name: str, run) -> None:
        began = time.perf_counter()
        try:
            report["sections"][name] = run()
        except Exception as e:  # one section's failure is a result too; the others still run
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report["sections"][name]["section_s"] = time.perf_counter() - began
        report["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{name}: {time.perf_counter() - began:.0f} s", flush=True)

    section("parity", lambda: check_parity(s, device))
    section("mfu", lambda: check_mfu(s, args.device))
    largest = report["sections"]["mfu"].get("largest_batch") or s["batches"][0]
    if args.smoke:
        report["sections"]["compile"] = {"skipped": "smoke: inductor's compile alone takes minutes on a CPU"}
    else:
        section("compile", lambda: check_compile(s, args.device, largest))
    with tempfile.TemporaryDirectory(prefix="m3ae-gpu-check-") as work:
        section("data", lambda: check_data(s, args.device, Path(work)))
    section("distributed", lambda: check_distributed(s, device))
    report["ok"] = all("error" not in v for v in report["sections"].values())
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({'all sections ran' if report['ok'] else 'some sections failed'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
