"""The share of pixels exactly 0 in each step's clipped estimate, and in the result: 100 samples, seed 0.

    python experiments/time_to_quality/bounded_loss/black_by_step.py CKPT [SAMPLER STEPS]

The estimate at a step is what the sampler's callback sees (clipped to [-1, 1]), read as uint8 the way pictures are.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch  # noqa: E402

from config import SampleConfig  # noqa: E402
from diffusion import generate  # noqa: E402
from pipeline import load_pipeline  # noqa: E402

pipe = load_pipeline(sys.argv[1], "cpu")
labels = torch.arange(10).repeat_interleave(10)
estimates = []
cfg = SampleConfig(sampler=sys.argv[2] if len(sys.argv) > 2 else "dpmpp-2m",
                   steps=int(sys.argv[3]) if len(sys.argv) > 3 else 10, guidance=2.0)
images, _ = generate(pipe.model, pipe.diffusion, labels, "cpu", "fp32", cfg, seed=0,
                     callback=lambda i, n, x0: estimates.append(((x0.clamp(-1, 1) + 1) * 127.5).round()))
print("steps", pipe.diffusion.sample_timesteps(cfg.sampler, cfg.steps))
print("black at each step:", " ".join(f"{(e == 0).float().mean():.3f}" for e in estimates))
f = images.float()
print(f"result: exactly 0 {(f == 0).float().mean():.3f}, at most 5 {(f <= 5).float().mean():.3f}, "
      f"at most 12 {(f <= 12).float().mean():.3f}, ink {(f / 255).mean():.4f}")
