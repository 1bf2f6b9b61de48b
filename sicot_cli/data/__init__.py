"""Everything that reads raw data: prepare, tokenize, vocabulary, word vectors, the built-in dataset."""
