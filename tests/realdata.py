"""Real data that ships inside packages, written as the files users have: PNG folders, GIF, MRC, PLY."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_folder(root: Path, count: int = 300, start: int = 0, size: int = 8) -> Path:
    """scikit-learn's handwritten digits as PNGs in one sub-folder per class (the label); ``size`` other
    than 8 upsamples them (bicubic), as users save small digits for a model that wants 32x32."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(start, start + count):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
        if size != 8:
            image = image.resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:04d}.png")
    return root


def gif_path() -> Path:
    """scikit-image's 24-frame GIF (14 x 25 pixels, RGB)."""
    import skimage

    return Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"


def mni_volume(resolution: int = 2) -> np.ndarray:
    """nilearn's MNI152 template, a real 3-D MRI volume (z, y, x), float32 in [0, 1]."""
    from nilearn.datasets import load_mni152_template

    data = np.asarray(load_mni152_template(resolution=resolution).get_fdata(), dtype=np.float32)
    data = np.transpose(data, (2, 1, 0))
    return (data - data.min()) / max(float(data.max() - data.min()), 1e-9)


def mni_mrc(path: Path, resolution: int = 2) -> Path:
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(mni_volume(resolution))
        mrc.voxel_size = float(resolution)
    return path


def brain_clouds(folder: Path, count: int = 4, points: int = 2048, seed: int = 0) -> Path:
    """Point clouds sampled on the MNI152 brain surface (marching cubes), written as binary PLY files."""
    from plyfile import PlyData, PlyElement
    from skimage.measure import marching_cubes

    volume = mni_volume(2)
    verts, _faces, _n, _v = marching_cubes(volume, level=0.3)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        picked = verts[rng.choice(len(verts), size=points, replace=False)].astype(np.float32)
        vertex = np.array([tuple(p) for p in picked], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(folder / f"brain{k}.ply"))
    return folder


def fit_digits(model, plan, targets_BN, context_BP, vocab, steps: int, *, batch: int = 32, lr: float = 3e-3,
               cond_dropout: float = 0.1) -> list[float]:
    """Train ``model`` in-process on laid-out digits (AdamW, seeded batches, CFG condition dropout, MaskGIT's
    masking for a masked plan, as the train stage does); the losses."""
    import torch

    from arpipe.stages.models import batch_inputs, drop_conditions, mask_for_training

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(targets_BN), (batch,), generator=g)
        inputs = batch_inputs(plan, targets_BN[idx], context_BP[idx])
        inputs.input_ids = drop_conditions(inputs.input_ids, vocab, cond_dropout, generator=g)
        if plan.paradigm == "masked":
            inputs = mask_for_training(inputs, g)
        _, loss = model(**inputs.as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def digits_model_folder(root: Path, *, paradigm: str = "next_token", steps: int = 300, levels: int = 4) -> Path:
    """A model folder as a train stage writes it, trained here in-process on scikit-learn's digits.

    The tokenizer is a real ``patch_vq`` artifact (1x1 patches, ``levels`` grey levels, an 8x8 grid);
    the model is a 2-layer transformer conditioned on the digit class. Returns ``root/model``.
    """
    import json

    import torch
    from sklearn.datasets import load_digits

    from arpipe.stages.modalities import make_tokenizer
    from arpipe.stages.models import ModelConfig, Transformer, VocabLayout, make_plan
    from arpipe.stages.models.io import save_model

    digits = load_digits()
    images = (digits.images[:, None] / 16).astype(np.float32)
    tok = make_tokenizer("patch_vq", input_shape=[1, 8, 8], patch=[1, 1], codebook_size=levels).fit(images)
    tok_uri = str(root / "tokenizer")
    digest = tok.save(tok_uri)
    codes = torch.from_numpy(np.stack(tok.encode_arrays(list(images))).reshape(len(images), -1))
    vocab = VocabLayout.build({"image": levels}, classes=range(10))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=3,
                                    paradigm=paradigm, block_size=8 if paradigm == "next_block" else 1,
                                    max_seq_len=66))
    plan = make_plan(paradigm, grid=(8, 8), n_axes=3, block_size=8 if paradigm == "next_block" else 1)
    context = torch.tensor([vocab.context("image", str(y)) for y in digits.target])
    targets = vocab.to_global("image", codes)
    fit_digits(model, plan, targets, context, vocab, steps)
    folder = save_model(root / "model", model.eval(), vocab=vocab)
    (folder / "tokenizers.json").write_text(json.dumps({"image": {
        "modality": "image", "tokenizer_uri": tok_uri, "tokenizer_digest": digest, "layout": tok.layout(),
        "store": None}}))
    return folder
