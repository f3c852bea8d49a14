"""The domain: token store, modality readers and tokenizers, AR models, and one module per stage kind."""
