from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.interop.official import infer_config, to_torch_state_dict

OFFICIAL = Path(__file__).parent / "fixtures" / "official_m3ae"
# what the fixtures' parameter shapes cannot tell (official_m3ae_fixtures.json, "sizes" and configs)
FIXTURE_SIZES = dict(num_heads=4, dec_num_heads=2, image_size=48, text_length=18)


class Fixture:
    """One golden npz file and the official model built from its parameters."""

    def __init__(self, name: str) -> None:
        self.data = np.load(OFFICIAL / name)
        self.flat = {k.removeprefix("params/"): self.data[k] for k in self.data.files if k.startswith("params/")}
        self.config = infer_config(self.flat, masking="shared", **FIXTURE_SIZES)
        self.model = M3AE(self.config)
        self.model.load_state_dict(to_torch_state_dict(self.flat, self.config.output_head_depth))

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.data[key]))

    def __contains__(self, key: str) -> bool:
        return key in self.data.files

    @property
    def image(self) -> torch.Tensor:
        return self["input/image"].permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW

    def grads(self, branch: str) -> dict[str, torch.Tensor]:
        """Official gradients of `branch`, keyed by our parameter names, in our layouts."""
        prefix = f"{branch}/grads/params/"
        flat = {k.removeprefix(prefix): self.data[k] for k in self.data.files if k.startswith(prefix)}
        return to_torch_state_dict(flat, self.config.output_head_depth)


@pytest.fixture(scope="session")
def m3ae_tiny() -> Fixture:
    return Fixture("m3ae_tiny.npz")


@pytest.fixture(scope="session")
def m3ae_tiny_head1() -> Fixture:
    return Fixture("m3ae_tiny_head1.npz")


@pytest.fixture(scope="session")
def mae_tiny() -> Fixture:
    return Fixture("mae_tiny.npz")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, data): a tiny M3AE saved in root/model and a labelled synthetic set in shards (48
    train, 16 val samples, 32 px) at `data`: what the transfer commands read."""
    from m3ae.data.synth import SynthSpec, generate

    root = tmp_path_factory.mktemp("transfer")
    data = generate(root / "data", SynthSpec(seed=0, train=48, val=16, image_size=32, shard_size=24), processes=1)
    torch.manual_seed(0)
    M3AE(M3AEConfig(emb_dim=32, depth=2, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, image_size=32,
                    patch_size=8, text_length=16)).save_pretrained(root / "model")
    return root, data


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """The parity criterion: within `tol` absolute, or relative for large values."""
    actual, expected = actual.detach().double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), f"{what}: max abs error {error:.3g}"


def pytest_configure(config):
    """The suite neither reads nor writes the user's m3ae cache: a precision probe kept there (from
    another torch, say) would decide for the tests. Set in the environment, so that the processes
    tests start (DDP ranks, CLI runs) share the session's cache."""
    config.m3ae_cache = tempfile.TemporaryDirectory(prefix="m3ae-test-cache-")
    os.environ["M3AE_CACHE_DIR"] = config.m3ae_cache.name


def pytest_unconfigure(config):
    os.environ.pop("M3AE_CACHE_DIR", None)
    config.m3ae_cache.cleanup()


def pytest_report_header(config):
    """What the run exercised: the kernels torch dispatches and what `precision: auto` takes on them
    (a test that compares numbers must pass whichever it is)."""
    from m3ae.engine.runtime import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))
    return [f"m3ae: CPU kernels {torch.backends.cpu.get_cpu_capability()}; precision auto -> {auto.name} "
            f"({auto.reason})"]
