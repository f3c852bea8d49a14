"""An arpipe plugin: the ``token_stats`` stage kind, the ``levels`` tokenizer and the ``depth`` reader."""
