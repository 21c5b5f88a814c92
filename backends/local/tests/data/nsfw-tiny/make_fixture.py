"""Make the tiny random-weight NSFW classifier fixture (transformers ViTForImageClassification).

Run once with torch + transformers (+ pillow, safetensors) installed:

    python make_fixture.py            # writes into this directory

The layout is that of `Falconsai/nsfw_image_detection` (config.json, preprocessor_config.json,
model.safetensors), with every size changed to small, non-default values so that a shape taken
from anywhere but the config fails the parity test. Weights are random but scaled up (and the
classifier bias placed between the cases) so that the logits are far from zero and the cases
disagree: some are flagged, some are not.
"""

import json
import pathlib

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

HERE = pathlib.Path(__file__).parent
KLEIN = HERE.parent / "klein-tiny" / "cases"

torch.manual_seed(1234)
config = ViTConfig(
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=40,
    hidden_act="gelu",
    image_size=48,
    patch_size=8,
    num_channels=3,
    qkv_bias=True,
    layer_norm_eps=1e-12,
    id2label={0: "normal", 1: "nsfw"},
    label2id={"normal": 0, "nsfw": 1},
    architectures=["ViTForImageClassification"],
)
model = ViTForImageClassification(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        else:
            p.copy_(0.3 * torch.randn_like(p))

processor = ViTImageProcessor(
    do_resize=True,
    size={"height": 48, "width": 48},
    resample=2,  # PIL bilinear, as Falconsai's preprocessor_config.json
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


def gradient(w, h):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


images = {
    "klein_t2i": Image.open(KLEIN / "t2i_distilled.png").convert("RGB"),  # 64x64: downsampled
    "klein_edit": Image.open(KLEIN / "edit_1ref.png").convert("RGB"),  # 80x64: non-square
    "gradient": gradient(300, 200),  # large downsampling factor
    "small": gradient(40, 30),  # upsampled
}
names = list(images)
for n in names[2:]:
    images[n].save(HERE / f"{n}.png")

pixel_values = processor(images=[images[n] for n in names], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixel_values=pixel_values).logits
    # Put the decision boundary between the cases.
    margin = (logits[:, 1] - logits[:, 0]).sort().values
    mid = len(margin) // 2
    bias_shift = -(margin[mid - 1] + margin[mid]).item() / 2
    model.classifier.bias[1] += bias_shift
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    logits = out.logits

flagged = (logits.softmax(-1)[:, 1] > 0.5).tolist()
assert any(flagged) and not all(flagged), flagged

model.save_pretrained(HERE, safe_serialization=True)
processor.save_pretrained(HERE)
tensors = {
    "pixel_values": pixel_values.contiguous(),
    "embeddings": out.hidden_states[0].contiguous(),
    "logits": logits.contiguous(),
}
save_file(tensors, HERE / "cases.safetensors")
(HERE / "cases.json").write_text(
    json.dumps(
        {
            "images": [
                f"../klein-tiny/cases/{'t2i_distilled' if n == 'klein_t2i' else 'edit_1ref'}.png"
                if n.startswith("klein")
                else f"{n}.png"
                for n in names
            ],
            "nsfw": flagged,
            "probabilities": logits.softmax(-1)[:, 1].tolist(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "pillow": __import__("PIL").__version__,
        },
        indent=2,
    )
    + "\n"
)
print("flagged", flagged, "logits", logits.tolist())
