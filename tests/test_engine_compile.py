"""`train.compile`: how the engine hands the transformer blocks to torch.compile."""

from __future__ import annotations

import torch

from m3ae.engine.distributed import apply_compile
from m3ae.model import M3AE, M3AEConfig


def test_compiled_blocks_trace_the_encoder_and_decoder_shapes_as_static_graphs(monkeypatch):
    # Encoder and decoder blocks share Block.forward, so the decoder's first call is a recompile; left
    # to dynamo's default it marks the sequence length dynamic and every later graph is symbolic
    # (docs/BENCHMARKS.md, "torch.compile"). A recording backend stands in for inductor.
    graphs = []

    def recording_backend(gm, example_inputs):
        symbolic = False
        for node in gm.graph.nodes:
            value = node.meta.get("example_value") if node.op == "placeholder" else None
            if isinstance(value, torch.SymInt) or (
                isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
            ):
                symbolic = True
        graphs.append(symbolic)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": recording_backend}))
    torch._dynamo.reset()
    try:
        cfg = M3AEConfig(image_size=32, patch_size=8, text_length=12, vocab_size=50, emb_dim=32, depth=2, num_heads=2,
                         dec_emb_dim=16, dec_depth=2, dec_num_heads=2)
        model = M3AE(cfg)
        apply_compile(model)
        g = torch.Generator().manual_seed(0)
        image, text = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 50, (2, 12), generator=g)
        # the second step must reuse the graphs, also with captions of other lengths: compiled, the
        # decoder keeps its full length (no trimming of trailing padding, whose length follows the batch)
        for lengths in ([9, 7], [5, 10]):
            pad = torch.arange(12)[None, :] >= torch.tensor(lengths)[:, None]
            model(image, text, pad, compute_logits=False)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2 and not any(graphs)  # one graph per block shape (encoder, decoder), no symbols
