"""The stages `kleingate bench-engine` times, run in diffusers/PyTorch on the same config.json files,
shapes, dtype, threads, warm-up and iteration count, with random weights. Prints one JSON object:
{"stages": {"text encoder": ms, ...}, "peak_memory_bytes": n, "versions": {...}}.

Called by `kleingate bench-engine --compare-diffusers PYTHON` (see docs/engine.md,
side by side with diffusers); it can also be run alone:

    python3 diffusers_bench.py --configs backends/local/configs/cpu-mid --width 256 --height 256 \
        --seq-len 128 --threads 2 --device cpu --dtype f32 --warmup 1 --iters 3

Needs PyPI's torch, diffusers==0.42.1 and transformers. What each stage runs is what the klein
pipeline runs: the text encoder as the pipeline calls it (Qwen3ForCausalLM with all hidden
states, the vocabulary logits included), one transformer forward (batch 1, and batch 2 for a CFG
step), the VAE decoder and encoder, and a distilled image of 4 steps (text encoder, 4 transformer
steps with Euler updates, VAE decode).

With --serve (how `bench-engine` runs it) it builds the models, prints `{"ready": true}` and then
answers one line per request on stdin: `run STAGE` runs that stage once and prints
`{"ms": time}`, so the caller can time the same stage on both sides back to back; `end` prints the
report (without stages) and exits.
"""

import argparse
import json
import os
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", required=True, help="directory with text_encoder/, transformer/, vae/ config.json")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--serve", action="store_true", help="time stages one run at a time on request (stdin)")
    a = p.parse_args()

    import torch
    import diffusers
    import transformers
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = torch.device(a.device)

    def load(part):
        with open(os.path.join(a.configs, part, "config.json")) as f:
            return json.load(f)

    te_cfg = load("text_encoder")
    te_cfg.pop("architectures", None)
    te = Qwen3ForCausalLM(Qwen3Config(**te_cfg)).to(dev, dtype).eval()
    tr = Flux2Transformer2DModel.from_config(load("transformer")).to(dev, dtype).eval()
    vae = AutoencoderKLFlux2.from_config(load("vae")).to(dev, dtype).eval()

    tr_cfg = tr.config
    m = 2 ** (len(vae.config.block_out_channels) - 1) * 2  # VAE scale x patch size
    h, w = a.height // m, a.width // m
    n = h * w
    L = a.seq_len
    c = tr_cfg.in_channels
    joint = tr_cfg.joint_attention_dim

    ids = torch.tensor([[(i * 7919) % te_cfg["vocab_size"] for i in range(L)]], device=dev)
    mask = torch.ones_like(ids)
    # Position ids as the pipeline builds them: (t, h, w, l) per token.
    txt_ids = torch.zeros(L, 4, device=dev)
    txt_ids[:, 3] = torch.arange(L, device=dev)
    img_ids = torch.zeros(h, w, 4, device=dev)
    img_ids[..., 1] = torch.arange(h, device=dev)[:, None]
    img_ids[..., 2] = torch.arange(w, device=dev)[None, :]
    img_ids = img_ids.reshape(n, 4)
    ctx = torch.randn(1, L, joint, device=dev, dtype=dtype)
    ctx2 = torch.cat([ctx, ctx])
    x = torch.randn(1, n, c, device=dev, dtype=dtype)
    x2 = torch.cat([x, x])
    t1 = torch.full((1,), 1.0, device=dev, dtype=dtype)
    t2 = torch.full((2,), 1.0, device=dev, dtype=dtype)
    lat_ch = vae.config.latent_channels
    latents = torch.randn(1, lat_ch, 2 * h, 2 * w, device=dev, dtype=dtype)
    pixels = torch.rand(1, 3, a.height, a.width, device=dev, dtype=dtype) * 2 - 1

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(f):
        for _ in range(a.warmup):
            f()
            sync()
        runs = []
        for _ in range(max(a.iters, 1)):
            sync()
            s = time.perf_counter()
            f()
            sync()
            runs.append((time.perf_counter() - s) * 1e3)
        return statistics.median_low(runs) if len(runs) % 2 == 0 else statistics.median(runs)

    def encode():
        out = te(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        return torch.cat([hs[9], hs[18], hs[27]], dim=-1)

    def step(xx, cc, tt):
        return tr(hidden_states=xx, encoder_hidden_states=cc, timestep=tt, img_ids=img_ids,
                  txt_ids=txt_ids, return_dict=False)[0]

    def image():
        cc = encode()
        z = torch.randn(1, n, c, device=dev, dtype=dtype)
        sigmas = torch.linspace(1.0, 0.0, 5)
        for i in range(4):
            v = step(z, cc, torch.full((1,), float(sigmas[i]), device=dev, dtype=dtype))
            z = z + (sigmas[i + 1] - sigmas[i]) * v
        lat = z.reshape(1, h, w, c).permute(0, 3, 1, 2)
        lat = lat.reshape(1, lat_ch, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(1, lat_ch, 2 * h, 2 * w)
        img = vae.decode(lat, return_dict=False)[0]
        return (img * 0.5 + 0.5).clamp(0, 1)

    runs = {
        "text encoder": encode,
        "transformer step": lambda: step(x, ctx, t1),
        "CFG step (batch 2)": lambda: step(x2, ctx2, t2),
        "VAE decode": lambda: vae.decode(latents, return_dict=False),
        "VAE encode": lambda: vae.encode(pixels),
        "distilled image (4 steps)": image,
    }

    def report():
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "peak_memory_bytes": peak,
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
        }

    def say(obj):
        json.dump(obj, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()

    with torch.inference_mode():
        if a.serve:
            say({"ready": True})
            for line in sys.stdin:
                cmd, _, arg = line.strip().partition(" ")
                if cmd == "end":
                    say(report())
                    return
                if cmd != "run" or arg not in runs:
                    say({"error": f"unknown request {line.strip()!r}"})
                    continue
                sync()
                s = time.perf_counter()
                runs[arg]()
                sync()
                say({"ms": (time.perf_counter() - s) * 1e3})
            return
        stages = {name: timed(f) for name, f in runs.items()}
    say({"stages": stages, **report()})


if __name__ == "__main__":
    main()
