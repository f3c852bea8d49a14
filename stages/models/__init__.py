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

Save / load: ``save_model(dir, model, vocab=vocab)``, ``load_model(dir)``, ``load_vocab(dir)``.
"""

from .config import PARADIGMS, PRESET_SIZES, PRESETS, ModelConfig, Paradigm, count_parameters, preset
from .io import load_config, load_model, load_vocab, save_model
from .masks import attention_mask, cached_attention_mask
from .rope import apply_rope, rope_angles, rope_sections
from .sampling import Generation, Prompt, SamplingOptions, draw, generate, process_logits, sample_generator
from .sequence import (
    IGNORE_INDEX,
    ModelInputs,
    Plan,
    batch_inputs,
    make_plan,
    pack_documents,
    plan_for,
    plan_from_layout,
)
from .sjd import generate_sjd
from .transformer import KVCache, Transformer
from .vocab import BOS, EOS, NULL, PAD, VocabLayout, drop_conditions

__all__ = [
    "BOS", "EOS", "IGNORE_INDEX", "NULL", "PAD", "PARADIGMS", "PRESETS", "PRESET_SIZES", "Generation", "KVCache",
    "ModelConfig", "ModelInputs", "Paradigm", "Plan", "Prompt", "SamplingOptions", "Transformer", "VocabLayout",
    "apply_rope", "attention_mask", "batch_inputs", "cached_attention_mask", "count_parameters", "draw",
    "drop_conditions", "generate", "generate_sjd", "load_config", "load_model", "load_vocab", "make_plan",
    "pack_documents", "plan_for", "plan_from_layout", "preset", "process_logits", "rope_angles", "rope_sections",
    "sample_generator", "save_model",
]
