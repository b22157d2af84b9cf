"""Token sets: pre-tokenized datasets on disk (`records`), written by `mmjax.pretokenize`."""
