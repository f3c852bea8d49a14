"""Autoregressive vision models: pure torch (no Ray, DeepSpeed or MLflow), used by the train and sample stages.

Training step (one paradigm for the whole model, one plan per token layout)::

    vocab = VocabLayout.build({"image": 512}, classes=range(10))
    config = preset("tiny", vocab_size=vocab.vocab_size, paradigm="next_scale").validate()
    model = Transformer(config)
    plan = plan_for(config, scales=[1, 2, 4, 8])          # = make_plan("next_scale", scales=..., n_axes=...)
    context_BP = torch.tensor([vocab.context("image", y) for y in labels])
    batch = batch_inputs(plan, vocab.to_global("image", codes_BN), context_BP)   # or pack_documents(...)
    batch.input_ids = drop_conditions(batch.input_ids, vocab, config.cond_dropout, doc_ids_BL=batch.doc_ids)
    logits, loss = model(**batch.as_kwargs())

Sampling::

    prompt = Prompt.from_vocab(vocab, "image", labels)
    out = generate(model, plan, prompt, SamplingOptions(cfg_scale=1.5), seed=0, sample_indices=range(8))
    codes_BN = vocab.to_local("image", out.tokens)      # out.forward_passes == plan.n_groups
    # next_token: speculative Jacobi decoding, optionally with LANTERN's relaxed acceptance
    lantern = Relaxation.from_codebook(tokenizer.code_embeddings(), k=4, delta=0.2,
                                       start=vocab.code_range("image")[0], vocab_size=vocab.vocab_size)
    out = generate_sjd(model, plan, prompt, seed=0, window=16, relaxation=lantern)
    # masked (MaskGIT): train on mask_for_training(batch, generator); decode in a few parallel steps
    out = generate_masked(model, plan, prompt, SamplingOptions(), MaskedDecoding(steps=8), seed=0)
    # next_token trained on TokenUnify's mixture: batch = mix_objectives(batch, ObjectiveMix(0.2, 0.6, 0.2), gen)
    # next_level (octree point clouds, G3PT): a plan per tree, one level per forward
    levels = OctreePlan(depth=4, n_tokens=300)            # = plan_for_modality(config, octree_layout, 300)
    batch = pack_documents([[(levels.plan_of(masks_N), vocab.to_global("pointcloud", masks_N), context_P)]], 302)
    out = generate(model, levels, prompt, seed=0)          # out.forward_passes == 4; out.lengths: each tree's

Save / load: ``save_model(dir, model, vocab=vocab)``, ``load_model(dir)``, ``load_vocab(dir)``; a train stage's
whole folder (config, vocab, tokenizers, scale inputs, weights, local or s3://): ``open_model(uri)``.
"""

# Lazy: `stages.models.config` (plain data, no torch) must import without torch for `arpipe validate`.
_EXPORTS: dict[str, str] = {
    "PARADIGMS": "config",
    "PRESET_SIZES": "config",
    "PRESETS": "config",
    "ModelConfig": "config",
    "Paradigm": "config",
    "count_parameters": "config",
    "preset": "config",
    "compile_blocks": "compile",
    "compile_unavailable": "compile",
    "ModelFolder": "folder",
    "fetch_model": "folder",
    "open_model": "folder",
    "plan_for_modality": "folder",
    "segment_names": "diagnostics",
    "segment_scores": "diagnostics",
    "Relaxation": "lantern",
    "code_neighbours": "lantern",
    "load_config": "io",
    "load_model": "io",
    "load_scale_inputs": "io",
    "load_vocab": "io",
    "save_model": "io",
    "attention_mask": "masks",
    "cached_attention_mask": "masks",
    "apply_rope": "rope",
    "rope_angles": "rope",
    "rope_sections": "rope",
    "Generation": "sampling",
    "Prompt": "sampling",
    "SamplingOptions": "sampling",
    "draw": "sampling",
    "generate": "sampling",
    "process_logits": "sampling",
    "sample_generator": "sampling",
    "IGNORE_INDEX": "sequence",
    "ModelInputs": "sequence",
    "Plan": "sequence",
    "ScaleInput": "sequence",
    "batch_inputs": "sequence",
    "context_coords": "sequence",
    "known_cells": "sequence",
    "make_plan": "sequence",
    "pack_documents": "sequence",
    "plan_for": "sequence",
    "plan_from_layout": "sequence",
    "generate_sjd": "sjd",
    "MaskedDecoding": "maskgit",
    "generate_masked": "maskgit",
    "mask_for_training": "maskgit",
    "mask_ratio": "maskgit",
    "sequential_nll": "maskgit",
    "OBJECTIVES": "tokenunify",
    "ObjectiveMix": "tokenunify",
    "mix_objectives": "tokenunify",
    "OctreePlan": "levels",
    "generate_levels": "levels",
    "level_inputs": "levels",
    "octree_depth": "levels",
    "KVCache": "transformer",
    "Transformer": "transformer",
    "BOS": "vocab",
    "EOS": "vocab",
    "MASK": "vocab",
    "NULL": "vocab",
    "PAD": "vocab",
    "VocabLayout": "vocab",
    "drop_conditions": "vocab",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'arpipe.stages.models' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BOS", "EOS", "IGNORE_INDEX", "MASK", "MaskedDecoding", "NULL", "OBJECTIVES", "ObjectiveMix", "PAD", "PARADIGMS", "PRESETS", "PRESET_SIZES", "Generation", "KVCache",
    "ModelConfig", "ModelFolder", "ModelInputs", "OctreePlan", "Paradigm", "Plan", "Prompt", "Relaxation", "SamplingOptions", "ScaleInput", "Transformer", "VocabLayout",
    "apply_rope", "attention_mask", "batch_inputs", "cached_attention_mask", "code_neighbours", "compile_blocks", "compile_unavailable", "context_coords", "count_parameters", "draw",
    "drop_conditions", "fetch_model", "generate", "generate_levels", "generate_masked", "generate_sjd", "known_cells", "level_inputs", "load_config", "load_model", "load_scale_inputs", "load_vocab", "make_plan", "mask_for_training", "mask_ratio", "mix_objectives",
    "octree_depth", "open_model", "pack_documents", "plan_for", "plan_for_modality", "plan_from_layout", "preset", "process_logits", "rope_angles", "rope_sections",
    "sample_generator", "save_model", "segment_names", "segment_scores", "sequential_nll",
]
