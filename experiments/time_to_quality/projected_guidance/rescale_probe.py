"""evaluate.py with guidance rescale (Lin et al. 2024, Algorithm 2) on the network's output, a lever measured here
and not kept (it is not in the code):

    python experiments/time_to_quality/projected_guidance/rescale_probe.py PHI [evaluate.py args]

The guided output g = c + w (c - u) is rescaled to the conditional output's spread per image, std(c) / std(g), and
mixed back: phi of the rescaled, 1 - phi of g (diffusers' guidance_rescale)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import diffusion  # noqa: E402
import evaluate  # noqa: E402

PLAIN = diffusion.Diffusion.guided_output


def rescaled_output(self, model, x, t, labels, guidance, null_label):
    if guidance == 0:
        return PLAIN(self, model, x, t, labels, guidance, null_label)
    c, u = self.both_outputs(model, x, t, labels, null_label)
    g = c + guidance * (c - u)
    std_c, std_g = (v.flatten(1).std(1).view(-1, 1, 1, 1) for v in (c, g))
    return PHI * g * std_c / std_g + (1 - PHI) * g


if __name__ == "__main__":
    PHI = float(sys.argv[1])
    diffusion.Diffusion.guided_output = rescaled_output
    sys.exit(evaluate.main(sys.argv[2:]))
