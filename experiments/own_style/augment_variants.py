"""lora_finetune.py with another augmentation, for experiments/own_style's D_all_r2_aug_px and D_all_r2_aug_mild only:

    AUG=px|mild python experiments/own_style/augment_variants.py LORA_FINETUNE_ARGS...

px: whole-pixel shifts of up to 2 px and nothing else; mild: rotations of up to 5 deg, scalings 0.95..1.05, shifts
of up to 1 px (style_training.augment with smaller constants). Both run with --augment on (then auto, the default)."""
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
import style_training, lora_finetune
mode = os.environ["AUG"]
orig = style_training.augment
def augment(images_u8, copies, seed):
    if copies <= 1:
        return images_u8.clone()
    if mode == "px":
        g = torch.Generator().manual_seed(seed)
        out = [images_u8]
        for _ in range(copies - 1):
            sh = torch.randint(-2, 3, (len(images_u8), 2), generator=g)
            var = torch.zeros_like(images_u8)
            for i, (dy, dx) in enumerate(sh.tolist()):
                var[i] = torch.roll(images_u8[i], (dy, dx), (0, 1))
            out.append(var)
        return torch.cat(out)
    style_training.AUGMENT_DEGREES, style_training.AUGMENT_SCALE, style_training.AUGMENT_SHIFT = 5.0, (0.95, 1.05), 1.0
    return orig(images_u8, copies, seed)
style_training.augment = augment
sys.exit(lora_finetune.main(sys.argv[1:]))
