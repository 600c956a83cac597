"""The kernels of a lone LLaVA-1.5-7B request's first token, each against its alternatives (issue 5),
timed under CUDA graphs (triton.testing.do_bench_cudagraph, medians of --rounds alternating rounds, us):
- the CLIP tower (23 layers of ViT-L/14-336, one 336x336 image: 577 tokens), vlmserve's module in this
  tree against the one in --before's tree (its vlmserve/models/clip.py), same random weights;
- dense attention at the tower's shape (16 heads of 64, 577 tokens) and at the language model's
  prefill graph (32 heads of 128, causal over the 640-token bucket, 608 real): torch SDPA's cuDNN,
  flash and memory-efficient backends, and the Triton packed kernel on the real tokens;
- the GEMMs of the language model's prefill at 608 and 640 rows and of the tower at 577 rows through
  cuBLAS, and split over K in S parts (one batched GEMM, then the parts summed in float32).

    python scripts/gpu_ttft_kernels_probe.py --before .before_tree --out probe.json"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CLIPVisionConfig

DEV = os.environ.get("PROBE_DEVICE", "cuda")
DT = torch.bfloat16 if DEV == "cuda" else torch.float32


def bench(fn, rounds: int) -> float:
    import triton.testing as tt
    return statistics.median(tt.do_bench_cudagraph(fn, rep=40) * 1e3 for _ in range(rounds))


def clip_module(path: str):
    spec = importlib.util.spec_from_file_location(f"clip_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def towers(before: str | None) -> tuple[dict, dict, torch.Tensor]:
    """The tower of this tree and of `before`'s, on the same random weights: (their relative difference,
    the modules by tree name, an input image)."""
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    paths = {"now": os.path.join(os.path.dirname(__file__), "..", "vlmserve", "models", "clip.py")}
    if before:
        paths["before"] = os.path.join(before, "vlmserve", "models", "clip.py")
    torch.manual_seed(0)
    models, ref = {}, None
    for name, path in paths.items():
        m = clip_module(path).CLIPVisionModel(cfg, [-2]).to(DEV, DT)
        if ref is None:
            ref = {k: torch.randn_like(v) * 0.02 for k, v in m.state_dict().items()}
        sd = m.state_dict()
        for k in sd:
            if k in ref:
                sd[k].copy_(ref[k])
        # the tree whose tower keeps q, k and v apart takes the fused one's shards
        if "encoder.layers.0.self_attn.q_proj.weight" in sd and "encoder.layers.0.self_attn.qkv_proj.weight" in ref:
            for i in range(m.num_layers):
                a = f"encoder.layers.{i}.self_attn."
                for part in ("weight", "bias"):
                    for p, chunk in zip("qkv", ref[f"{a}qkv_proj.{part}"].chunk(3)):
                        sd[f"{a}{p}_proj.{part}"].copy_(chunk)
        models[name] = m
    x = torch.randn(1, 3, 336, 336, device=DEV, dtype=DT)
    out: dict = {}
    with torch.inference_mode():
        outs = {k: m(x)[0].float() for k, m in models.items()}
        if "before" in outs:
            out["tower_rel_diff_now_vs_before"] = float((outs["now"] - outs["before"]).norm() / outs["before"].norm())
    return out, models, x


def attention_rows(rounds: int) -> dict:
    from vlmserve.kernels import triton_packed_attention as tpk

    out = {}
    for name, (T, real, H, D, causal) in {"tower": (577, 577, 16, 64, False), "lm": (640, 608, 32, 128, True)}.items():
        x = torch.randn(T, 3, H, D, device=DEV, dtype=DT)
        q, k, v = (x[:, i].transpose(0, 1)[None] for i in range(3))  # [1, H, T, D] views, as the models make
        for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            def run(be=be):
                with sdpa_kernel(getattr(SDPBackend, be)):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=D ** -0.5)
            try:
                run()
                out[f"{name}_sdpa_{be}_us"] = bench(run, rounds)
            except Exception as e:
                out[f"{name}_sdpa_{be}_us"] = f"{type(e).__name__}: {str(e)[:80]}"
        cu = torch.tensor([0, real], device=DEV, dtype=torch.int32)
        qr, kr, vr = (x[:real, i] for i in range(3))
        try:
            out[f"{name}_triton_packed_us"] = bench(lambda: tpk.packed_attention(qr, kr, vr, cu, real, D ** -0.5,
                                                                                causal=causal), rounds)
        except Exception as e:
            out[f"{name}_triton_packed_us"] = f"{type(e).__name__}: {str(e)[:80]}"
    return out


def gemm_rows(rounds: int) -> dict:
    shapes = {"lm_down": (11008, 4096, (608, 640)), "lm_qkv": (4096, 12288, (640,)), "lm_o": (4096, 4096, (640,)),
              "lm_gate_up": (4096, 22016, (640,)), "tower_qkv": (1024, 3072, (577,)),
              "tower_q": (1024, 1024, (577,)), "tower_fc1": (1024, 4096, (577,)), "tower_fc2": (4096, 1024, (577,))}
    out = {}
    for name, (K, N, ms) in shapes.items():
        w = torch.randn(N, K, device=DEV, dtype=DT) * 0.02
        for M in ms:
            a = torch.randn(M, K, device=DEV, dtype=DT)
            t = bench(lambda: F.linear(a, w), rounds)
            out[f"{name}_M{M}_cublas_us"] = t
            out[f"{name}_M{M}_cublas_tflops"] = 2 * M * N * K / t / 1e6
            if name in ("lm_down", "tower_fc2", "tower_q"):
                for S in (2, 4):
                    if K % S:
                        continue
                    a3 = a.view(M, S, K // S).transpose(0, 1)  # [S, M, K/S]
                    w3 = w.view(N, S, K // S).permute(1, 2, 0)  # [S, K/S, N]

                    def split(a3=a3, w3=w3):
                        return torch.bmm(a3, w3).float().sum(0).to(DT)
                    out[f"{name}_M{M}_splitk{S}_us"] = bench(split, rounds)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--before", help="a tree whose vlmserve/models/clip.py is the tower to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="ttft_kernels_probe.json")
    args = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name()}
    t, models, x = towers(args.before)
    res.update(t)
    with torch.inference_mode():
        for _ in range(args.rounds):  # alternating
            for k, m in models.items():
                res.setdefault(f"tower_us_{k}_all", []).append(bench(lambda m=m: m(x), 1))
        for k in models:
            res[f"tower_us_{k}"] = statistics.median(res[f"tower_us_{k}_all"])
        res.update(attention_rows(args.rounds))
        res.update(gemm_rows(args.rounds))
    for k, v in res.items():
        print(f"{k}: {v}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
